//! TLS on the public listener: the certificate chain and private key are read
//! and checked once, when the config is loaded (any problem refuses start),
//! and the listener's Pingora settings (rustls, HTTP/2 by ALPN) are built from
//! what was read, so a file changed after the check cannot fail the listener.
//! Also the client settings of outgoing TLS (upstreams, the trace collector).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use pingora::listeners::tls::TlsSettings;
use pingora::tls::sign::{CertifiedKey, SingleCertAndKey};
use pingora::tls::CryptoProvider;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// TLS client settings verifying servers against `ca_file`'s CAs, or the system's.
pub fn client_config(ca_file: Option<&Path>) -> Result<pingora::tls::ClientConfig, String> {
    Ok(client_config_with(ca_roots(ca_file)?))
}

/// The CAs outgoing TLS trusts: `ca_file`'s, or the system's.
pub fn ca_roots(ca_file: Option<&Path>) -> Result<pingora::tls::RootCertStore, String> {
    let mut roots = pingora::tls::RootCertStore::empty();
    match ca_file {
        Some(path) => pingora::tls::load_ca_file_into_store(path, &mut roots)
            .map_err(|e| format!("cannot load the CA certificates of {}: {e}", path.display())),
        None => pingora::tls::load_platform_certs_incl_env_into_store(&mut roots)
            .map_err(|e| format!("cannot load the system's CA certificates: {e}")),
    }?;
    Ok(roots)
}

/// TLS client settings verifying servers against `roots`.
pub fn client_config_with(roots: pingora::tls::RootCertStore) -> pingora::tls::ClientConfig {
    pingora::tls::install_default_crypto_provider();
    pingora::tls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// A certificate chain and the private key that matches its first certificate.
#[derive(Clone)]
pub struct ListenerCert {
    key: Arc<CertifiedKey>,
}

/// Which of the two files a [`CertProblem`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertFile {
    /// `cert_file`: the PEM certificate chain.
    Chain,
    /// `key_file`: the PEM private key.
    Key,
}

/// Why a certificate or key cannot be used; the message never quotes key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertProblem {
    /// The file to blame.
    pub file: CertFile,
    /// What is wrong with it, naming its path.
    pub message: String,
}

impl CertProblem {
    fn chain(message: String) -> Self {
        CertProblem {
            file: CertFile::Chain,
            message,
        }
    }
    fn key(message: String) -> Self {
        CertProblem {
            file: CertFile::Key,
            message,
        }
    }
}

impl fmt::Debug for ListenerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ListenerCert({} certificate(s), key redacted)",
            self.key.cert.len()
        )
    }
}

impl ListenerCert {
    /// Reads the PEM chain in `cert_file` (leaf first) and the PEM private key
    /// (PKCS#8, PKCS#1 or SEC1) in `key_file`, and checks that they belong together.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<ListenerCert, CertProblem> {
        let chain_pem = std::fs::read(cert_file)
            .map_err(|e| CertProblem::chain(format!("cannot read {}: {e}", cert_file.display())))?;
        let key_pem = std::fs::read(key_file)
            .map_err(|e| CertProblem::key(format!("cannot read {}: {e}", key_file.display())))?;
        Self::from_pem(&chain_pem, &key_pem, cert_file, key_file)
    }

    /// [`ListenerCert::load`] on file contents already read; the paths are for messages.
    pub fn from_pem(
        chain_pem: &[u8],
        key_pem: &[u8],
        cert_file: &Path,
        key_file: &Path,
    ) -> Result<ListenerCert, CertProblem> {
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                CertProblem::chain(format!(
                    "{} is not a readable PEM file: {e}",
                    cert_file.display()
                ))
            })?;
        if chain.is_empty() {
            return Err(CertProblem::chain(format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                cert_file.display()
            )));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
            // pem::Error's text may quote a line of the file: say only what kind of problem.
            let what = match e {
                pem::Error::NoItemsFound => "holds no PEM private key",
                _ => "is not a readable PEM private key",
            };
            CertProblem::key(format!(
                "{} {what} (PKCS#8, PKCS#1 or SEC1)",
                key_file.display()
            ))
        })?;
        pingora::tls::install_default_crypto_provider();
        let Some(provider) = CryptoProvider::get_default() else {
            return Err(CertProblem::key("no TLS crypto provider installed".into()));
        };
        let signing = provider.key_provider.load_private_key(key).map_err(|e| {
            CertProblem::key(format!("{}: unusable private key: {e}", key_file.display()))
        })?;
        let certified = CertifiedKey::new(chain, signing);
        match certified.keys_match() {
            Ok(()) => {}
            // With Pingora's provider (ring) every key knows its public half, so
            // this is a mismatch, never "cannot tell".
            Err(pingora::tls::RusTlsError::InconsistentKeys(_)) => {
                return Err(CertProblem::key(format!(
                    "{} does not match the certificate in {}",
                    key_file.display(),
                    cert_file.display()
                )))
            }
            Err(e) => {
                return Err(CertProblem::chain(format!(
                    "{}: the first certificate cannot be used: {e}",
                    cert_file.display()
                )))
            }
        }
        Ok(ListenerCert {
            key: Arc::new(certified),
        })
    }

    /// Certificates in the chain, leaf included.
    pub fn chain_len(&self) -> usize {
        self.key.cert.len()
    }

    /// Pingora's settings for a TLS listener serving this certificate: TLS 1.2 and
    /// 1.3 (rustls), ALPN offering `h2` then `http/1.1`.
    pub fn tls_settings(&self) -> Result<TlsSettings, String> {
        // The paths are unused: a certificate resolver takes their place.
        let mut settings = TlsSettings::intermediate("", "").map_err(|e| e.to_string())?;
        settings.set_cert_resolver(Arc::new(SingleCertAndKey::from(self.key.clone())));
        settings.enable_h2();
        Ok(settings)
    }
}
