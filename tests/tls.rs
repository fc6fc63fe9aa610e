//! Upstream TLS: the gateway talks HTTPS to a simulator whose certificate is
//! issued by a private CA (made with the `openssl` command), verifying the
//! chain against `ca_file` and the certificate's name against `sni`.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// Makes a CA and a server certificate for `localhost` in `dir`.
fn make_certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl must be installed");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"],
        &ec[..],
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=chatgate test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    ]
    .concat());
    run(&[
        &["req"],
        &ec[..],
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext file");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
}

/// The TLS simulator's chat request count, read with `curl -k` (the test
/// client speaks plain HTTP only).
fn chat_requests(sim: &Simulator) -> u64 {
    let out = Command::new("curl")
        .args(["-sk", &format!("https://{}/_sim/stats", sim.addr())])
        .output()
        .expect("curl must be installed");
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats json");
    stats["chat_requests"].as_u64().expect("chat_requests")
}

async fn chat_through(sim: &Simulator, upstream_extra: &str) -> (u16, serde_json::Value) {
    let redis = Redis::start();
    let mut cfg = GatewayConfig::redis(&redis, &[]);
    cfg.upstreams = upstream_block(
        "main",
        &[sim.addr()],
        &format!("    tls: true\n    retries: 0\n{upstream_extra}"),
    );
    let gw = Gateway::start(cfg);
    gw.add_user("u", "p");
    let token = login(&gw, "u", "p").await;
    let resp = client()
        .post(gw.url("/chatCompletion"))
        .header("authorization", format!("Bearer {token}"))
        .body(r#"[{"role":"user","content":"over TLS"}]"#)
        .send()
        .await
        .expect("chat");
    json_reply(resp).await
}

#[tokio::test]
async fn verified_tls_to_the_upstream() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certificates(dir.path());
    let cert = dir.path().join("server.pem").display().to_string();
    let key = dir.path().join("server.key").display().to_string();
    let sim = Simulator::start(&["--tls-cert", &cert, "--tls-key", &key]);
    let ca = dir.path().join("ca.pem").display().to_string();

    let (status, body) =
        chat_through(&sim, &format!("    sni: localhost\n    ca_file: {ca}\n")).await;
    assert_eq!(
        (status, body["message"].as_str()),
        (200, Some("over TLS")),
        "{body}"
    );
    assert_eq!(
        chat_requests(&sim),
        1,
        "the request did not arrive over TLS"
    );

    // The certificate is for localhost, not for this name: refused.
    let (status, body) = chat_through(
        &sim,
        &format!("    sni: api.example.com\n    ca_file: {ca}\n"),
    )
    .await;
    assert_eq!(status, 500, "{body}");
    assert!(
        error_message(&body)
            .starts_with("Failed with chatbot.ChatCompletion: cannot connect to upstream"),
        "{body}"
    );

    // Without the private CA the chain is not trusted.
    let (status, _) = chat_through(&sim, "    sni: localhost\n").await;
    assert_eq!(status, 500);
    assert_eq!(
        chat_requests(&sim),
        1,
        "an unverified connection carried a request"
    );
}
