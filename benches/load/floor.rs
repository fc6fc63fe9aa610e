//! The load harness's floor: a bare Pingora `proxy_pass`, the framework chatgate is built on
//! with none of chatgate's work (no JWT, no JSON rewriting, no SSE transform, no Redis).
//! It forwards every request unchanged to one upstream over pooled keep-alive connections,
//! with the same Pingora settings the harness gives chatgate (2 threads, a large pool).
//!
//! What chatgate costs above this row is chatgate's; what this row costs above nginx is
//! Pingora's. Usage: `floor <listen addr> <upstream addr>` (both `127.0.0.1:port`).

use std::net::SocketAddr;

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

struct Floor {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        // An address, not a name: no DNS on the request path.
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

const USAGE: &str = "usage: floor <listen addr> <upstream addr>";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes `--bench` and `cargo test` passes nothing: do nothing then.
    let (Some(listen), Some(upstream)) =
        (args.first().filter(|a| !a.starts_with('-')), args.get(1))
    else {
        eprintln!("{USAGE}");
        return;
    };
    let Ok(upstream) = upstream.parse::<SocketAddr>() else {
        eprintln!("{USAGE}");
        std::process::exit(2);
    };
    let run_dir = std::env::temp_dir();
    let name = listen.replace([':', '.'], "-");
    let conf = ServerConf {
        pid_file: run_dir
            .join(format!("floor-{name}.pid"))
            .display()
            .to_string(),
        upgrade_sock: run_dir
            .join(format!("floor-{name}.sock"))
            .display()
            .to_string(),
        threads: 2,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        upstream_keepalive_pool_size: 20_000,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, Floor { upstream });
    proxy.add_tcp(listen);
    server.add_service(proxy);
    server.run_forever();
}
