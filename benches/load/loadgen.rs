//! Load client for `benches/load/run.sh`: open-loop fixed-rate requests (one late for its
//! slot counts from the slot, so queueing shows) and many concurrent SSE streams (time to
//! first event, gaps between paced events). Prints one JSON object; run only by the script.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const USAGE: &str = "usage (run by benches/load/run.sh):
  loadgen fixed  ADDR PATH BODY_FILE RATE SECONDS CONNECTIONS [HEADER...]
  loadgen stream ADDR PATH BODY_FILE STREAMS RAMP_SECONDS PACE_MS [HEADER...]";

/// Longest any single request or stream may take before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes `--bench` and `cargo test` passes nothing: do nothing then.
    let Some(mode) = args.first().filter(|a| !a.starts_with('-')) else {
        eprintln!("{USAGE}");
        return;
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start tokio: {e}");
            std::process::exit(2);
        }
    };
    let result = match mode.as_str() {
        "fixed" => runtime.block_on(fixed(&args[1..])),
        "stream" => runtime.block_on(streams(&args[1..])),
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(json) => println!("{json}"),
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    }
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Result<T, String> {
    args.get(i)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("missing or bad {what}\n{USAGE}"))
}

/// The raw bytes of one keep-alive POST.
fn request_bytes(addr: &str, path: &str, body: &[u8], headers: &[String]) -> Vec<u8> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// One keep-alive HTTP/1.1 client connection.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// How the response body is framed.
enum Framing {
    Length(usize),
    Chunked,
    Close,
}

impl Conn {
    async fn open(addr: &str) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(8192),
        })
    }

    async fn fill(&mut self) -> Result<(), String> {
        let mut chunk = [0u8; 16384];
        let n = self
            .stream
            .read(&mut chunk)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Sends `req` and reads the whole response; `on_data` sees each body piece as it arrives.
    async fn exchange(
        &mut self,
        req: &[u8],
        mut on_data: impl FnMut(&[u8]),
    ) -> Result<u16, String> {
        self.stream
            .write_all(req)
            .await
            .map_err(|e| e.to_string())?;
        let head_end = loop {
            if let Some(at) = find(&self.buf, b"\r\n\r\n") {
                break at + 4;
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).to_ascii_lowercase();
        let status: u16 = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or("bad status line")?;
        let framing = if head.contains("\r\ntransfer-encoding: chunked") {
            Framing::Chunked
        } else if let Some(at) = head.find("\r\ncontent-length:") {
            let rest = &head[at + 17..];
            let end = rest.find('\r').unwrap_or(rest.len());
            Framing::Length(rest[..end].trim().parse().map_err(|_| "bad length")?)
        } else {
            Framing::Close
        };
        self.buf.drain(..head_end);
        match framing {
            Framing::Length(n) => {
                while self.buf.len() < n {
                    self.fill().await?;
                }
                on_data(&self.buf[..n]);
                self.buf.drain(..n);
            }
            Framing::Chunked => loop {
                let line_end = loop {
                    if let Some(at) = find(&self.buf, b"\r\n") {
                        break at;
                    }
                    self.fill().await?;
                };
                let size_text = String::from_utf8_lossy(&self.buf[..line_end]).to_string();
                let size =
                    usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|_| "bad chunk size")?;
                while self.buf.len() < line_end + 2 + size + 2 {
                    self.fill().await?;
                }
                if size == 0 {
                    self.buf.drain(..line_end + 4);
                    break;
                }
                on_data(&self.buf[line_end + 2..line_end + 2 + size]);
                self.buf.drain(..line_end + 2 + size + 2);
            },
            Framing::Close => loop {
                on_data(&self.buf);
                self.buf.clear();
                if self.fill().await.is_err() {
                    return Err("close-delimited body".into());
                }
            },
        }
        Ok(status)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

/// Percentile (0-100) of sorted microsecond samples.
fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn read_body_file(path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))
}

/// Open loop: request `i` is due at `start + i / rate`; latency counts from that moment.
async fn fixed(args: &[String]) -> Result<String, String> {
    let addr: String = arg(args, 0, "ADDR")?;
    let path: String = arg(args, 1, "PATH")?;
    let body = read_body_file(&arg::<String>(args, 2, "BODY_FILE")?)?;
    let rate: f64 = arg(args, 3, "RATE")?;
    let seconds: f64 = arg(args, 4, "SECONDS")?;
    let connections: usize = arg(args, 5, "CONNECTIONS")?;
    let req = Arc::new(request_bytes(
        &addr,
        &path,
        &body,
        &args[6.min(args.len())..],
    ));
    let total = (rate * seconds) as usize;
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let start = Instant::now() + Duration::from_millis(50);
    let mut workers = Vec::new();
    for _ in 0..connections {
        let (addr, req, next, errors, samples) = (
            addr.clone(),
            Arc::clone(&req),
            Arc::clone(&next),
            Arc::clone(&errors),
            Arc::clone(&samples),
        );
        workers.push(tokio::spawn(async move {
            let mut conn = Conn::open(&addr).await.ok();
            let mut mine = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                // A worker that had to wait for its slot starts the clock when it sends: the
                // timer wheel wakes up to a millisecond late, which is not the server's doing.
                // One already behind its slot (all connections busy) counts from the slot.
                let early = Instant::now() < due;
                tokio::time::sleep_until(due.into()).await;
                let due = if early { Instant::now() } else { due };
                if conn.is_none() {
                    conn = Conn::open(&addr).await.ok();
                }
                let Some(c) = conn.as_mut() else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let outcome = tokio::time::timeout(REQUEST_TIMEOUT, c.exchange(&req, |_| {})).await;
                match outcome {
                    Ok(Ok(200)) => mine.push(due.elapsed().as_micros() as u64),
                    Ok(Ok(_)) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        conn = None;
                    }
                }
            }
            samples
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(mine);
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut s = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
    s.sort_unstable();
    Ok(format!(
        "{{\"ok\":{},\"errors\":{},\"rps\":{:.1},\"p50_us\":{},\"p99_us\":{},\"max_us\":{}}}",
        s.len(),
        errors.load(Ordering::Relaxed),
        s.len() as f64 / elapsed,
        pct(&s, 50.0),
        pct(&s, 99.0),
        s.last().copied().unwrap_or(0)
    ))
}

/// What one stream saw.
#[derive(Default)]
struct StreamSample {
    first_event_us: Option<u64>,
    /// Gaps between consecutive events at least half the pace apart, in µs.
    gaps_us: Vec<u64>,
    /// Those of them that ended after the ramp, when no stream was being opened.
    steady_gaps_us: Vec<u64>,
    error: bool,
}

/// `streams` concurrent SSE requests, opened evenly over `ramp` seconds, each on its own
/// connection. Events end with a blank line (`\n\n`), for the gateway's and OpenAI's framing.
async fn streams(args: &[String]) -> Result<String, String> {
    let addr: String = arg(args, 0, "ADDR")?;
    let path: String = arg(args, 1, "PATH")?;
    let body = read_body_file(&arg::<String>(args, 2, "BODY_FILE")?)?;
    let count: usize = arg(args, 3, "STREAMS")?;
    let ramp: f64 = arg(args, 4, "RAMP_SECONDS")?;
    let pace_ms: u64 = arg(args, 5, "PACE_MS")?;
    let req = Arc::new(request_bytes(
        &addr,
        &path,
        &body,
        &args[6.min(args.len())..],
    ));
    let paced = Duration::from_millis(pace_ms) / 2;
    let start = Instant::now();
    let ramp_end = start + Duration::from_secs_f64(ramp);
    let live = Arc::new(AtomicUsize::new(0));
    let peak_live = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let (addr, req, live, peak_live) = (
            addr.clone(),
            Arc::clone(&req),
            Arc::clone(&live),
            Arc::clone(&peak_live),
        );
        let due = start + Duration::from_secs_f64(ramp * i as f64 / count as f64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(due.into()).await;
            let mut sample = StreamSample::default();
            let now_live = live.fetch_add(1, Ordering::Relaxed) + 1;
            peak_live.fetch_max(now_live, Ordering::Relaxed);
            let run = async {
                let mut conn = Conn::open(&addr).await.map_err(|e| e.to_string())?;
                let sent = Instant::now();
                let mut last_event: Option<Instant> = None;
                let mut prev_lf = false;
                let status = conn
                    .exchange(&req, |data| {
                        let now = Instant::now();
                        let mut events = 0;
                        for &b in data {
                            if b == b'\n' && prev_lf {
                                events += 1;
                            }
                            prev_lf = b == b'\n';
                        }
                        if events == 0 {
                            return;
                        }
                        match last_event {
                            None => {
                                sample.first_event_us =
                                    Some(now.duration_since(sent).as_micros() as u64)
                            }
                            Some(t) => {
                                let gap = now.duration_since(t);
                                if gap >= paced {
                                    sample.gaps_us.push(gap.as_micros() as u64);
                                    if now > ramp_end {
                                        sample.steady_gaps_us.push(gap.as_micros() as u64);
                                    }
                                }
                            }
                        }
                        last_event = Some(now);
                    })
                    .await?;
                if status == 200 {
                    Ok(())
                } else {
                    Err(format!("status {status}"))
                }
            };
            let outcome = tokio::time::timeout(REQUEST_TIMEOUT, run).await;
            sample.error = !matches!(outcome, Ok(Ok(())));
            live.fetch_sub(1, Ordering::Relaxed);
            sample
        }));
    }
    let mut ttfe = Vec::with_capacity(count);
    let mut gaps = Vec::new();
    let mut steady_gaps = Vec::new();
    let mut errors = 0;
    for t in tasks {
        match t.await {
            Ok(s) => {
                if s.error {
                    errors += 1;
                }
                ttfe.extend(s.first_event_us);
                gaps.extend(s.gaps_us);
                steady_gaps.extend(s.steady_gaps_us);
            }
            Err(_) => errors += 1,
        }
    }
    ttfe.sort_unstable();
    gaps.sort_unstable();
    steady_gaps.sort_unstable();
    Ok(format!(
        "{{\"streams\":{count},\"errors\":{errors},\"peak_concurrent\":{},\"seconds\":{:.1},\"ttfe_p50_us\":{},\"ttfe_p99_us\":{},\"gap_p50_us\":{},\"gap_p99_us\":{},\"gaps\":{},\"steady_gap_p99_us\":{},\"steady_gaps\":{}}}",
        peak_live.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64(),
        pct(&ttfe, 50.0),
        pct(&ttfe, 99.0),
        pct(&gaps, 50.0),
        pct(&gaps, 99.0),
        gaps.len(),
        pct(&steady_gaps, 99.0),
        steady_gaps.len()
    ))
}
