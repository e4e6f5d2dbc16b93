//! The real-cluster suite's workload (image `svcplane-test/testpod:dev`, built static by
//! `e2e/cluster/images.sh` with plain `rustc`, so it uses std only).
//!
//! One HTTP/1.0 server on `$PORT` (8080), named `$POD_NAME` (else the hostname).
//! It also stands in for the two agnhost commands `examples/` use, so `make demo`
//! runs them unchanged but for the image: `netexec --http-port=N` serves on N, and
//! `porter` on every port named by a `SERVE_PORT_<N>` variable. On every port:
//!
//! - `GET /` answers `NAME\n`: which Pod a request through a Service reached.
//! - `GET /healthz` answers 200 while ready, 503 otherwise: the readiness probe.
//! - `GET /ready?set=false|true` flips that, so a test makes a real probe fail and pass.
//! - `GET /fetch?target=HOST:PORT&count=N` makes N requests `GET /` to HOST:PORT (a
//!   ClusterIP or a DNS name) one after the other, each on a new connection, and
//!   answers one line per request: `ok NAME` or `error WHY`. The test drives traffic
//!   from inside the cluster through this, without `kubectl exec`.
//! - `GET /resolve?name=NAME` answers the addresses the Pod's resolver (the cluster
//!   DNS from its resolv.conf) gives for NAME, one per line, or 502 and the error.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream, ToSocketAddrs},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

/// How long a fetched request may take to connect, and then to answer. A real
/// client's connect survives a lost SYN (Linux resends it after 1 s, then 2 s
/// later); with 1 s, one SYN lost on this loaded 2-core machine failed a request
/// that any client would have completed. 3.5 s allows two resends.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(3500);
/// Answers on a machine with both cores busy were seen to take over 2 s.
const ANSWER_TIMEOUT: Duration = Duration::from_millis(5000);
/// The most requests one `/fetch` makes.
const MAX_FETCH: usize = 1000;

fn main() {
    let name = std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()))
        .unwrap_or_else(|| "testpod".into());
    let ready = Arc::new(AtomicBool::new(true));
    let listeners: Vec<TcpListener> = ports().iter().map(|port| listen(port)).collect();
    let mut threads = Vec::new();
    for listener in listeners {
        let (name, ready) = (name.clone(), ready.clone());
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (name, ready) = (name.clone(), ready.clone());
                std::thread::spawn(move || serve(stream, &name, &ready));
            }
        }));
    }
    eprintln!("testpod {name} listening on {:?}", ports());
    for thread in threads {
        let _ = thread.join();
    }
}

/// The ports to serve: agnhost's `netexec --http-port=N`, `porter` (`SERVE_PORT_<N>`
/// variables), else `$PORT`, else 8080.
fn ports() -> Vec<String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ports: Vec<String> = match args.first().map(String::as_str) {
        Some("netexec") => {
            args.iter().filter_map(|a| a.strip_prefix("--http-port=")).map(str::to_string).take(1).collect()
        }
        Some("porter") => {
            std::env::vars().filter_map(|(k, _)| k.strip_prefix("SERVE_PORT_").map(str::to_string)).collect()
        }
        _ => std::env::var("PORT").into_iter().collect(),
    };
    if ports.is_empty() { vec!["8080".into()] } else { ports }
}

fn listen(port: &str) -> TcpListener {
    TcpListener::bind(format!("[::]:{port}"))
        .or_else(|_| TcpListener::bind(format!("0.0.0.0:{port}")))
        .unwrap_or_else(|e| {
            eprintln!("testpod: bind :{port}: {e}");
            std::process::exit(1)
        })
}

fn serve(mut stream: TcpStream, name: &str, ready: &AtomicBool) {
    let _ = stream.set_read_timeout(Some(ANSWER_TIMEOUT));
    let Some(target) = read_request_target(&mut stream) else { return };
    let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
    let param =
        |key: &str| query.split('&').find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')));
    let (status, body) = match path {
        "/" => (200, format!("{name}\n")),
        "/healthz" if ready.load(Ordering::Relaxed) => (200, "ok\n".into()),
        "/healthz" => (503, "not ready\n".into()),
        "/ready" => match param("set") {
            Some("true") => {
                ready.store(true, Ordering::Relaxed);
                (200, "ready\n".into())
            }
            Some("false") => {
                ready.store(false, Ordering::Relaxed);
                (200, "not ready\n".into())
            }
            _ => (400, "want ?set=true or ?set=false\n".into()),
        },
        "/fetch" => match (param("target"), param("count").and_then(|c| c.parse::<usize>().ok())) {
            (Some(target), Some(count)) => (200, fetch_many(target, count.min(MAX_FETCH))),
            _ => (400, "want ?target=HOST:PORT&count=N\n".into()),
        },
        "/resolve" => match param("name").map(|n| format!("{n}:0").to_socket_addrs()) {
            Some(Ok(addrs)) => (200, addrs.map(|a| format!("{}\n", a.ip())).collect()),
            Some(Err(e)) => (502, format!("error {e}\n")),
            None => (400, "want ?name=NAME\n".into()),
        },
        _ => (404, "not found\n".into()),
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        502 => "Bad Gateway",
        _ => "Service Unavailable",
    };
    let _ = write!(
        stream,
        "HTTP/1.0 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// The request target of `GET TARGET HTTP/1.x`, after the headers are read.
fn read_request_target(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    let mut words = text.lines().next()?.split_whitespace();
    if words.next()? != "GET" {
        return None;
    }
    words.next().map(str::to_string)
}

fn fetch_many(target: &str, count: usize) -> String {
    (0..count)
        .map(|_| match fetch(target) {
            Ok(name) => format!("ok {name}\n"),
            Err(why) => format!("error {why}\n"),
        })
        .collect()
}

/// `GET /` on a new connection to `target`; the answering Pod's name.
fn fetch(target: &str) -> Result<String, String> {
    let addr = target
        .to_socket_addrs()
        .map_err(|e| format!("resolve {target}: {e}"))?
        .next()
        .ok_or_else(|| format!("resolve {target}: no address"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(|e| e.to_string())?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").map_err(|e| format!("send to {addr}: {e}"))?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(|e| format!("read from {addr}: {e}"))?;
    let (head, body) = answer.split_once("\r\n\r\n").ok_or_else(|| format!("{addr}: no HTTP answer"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{addr}: {}", head.lines().next().unwrap_or("")));
    }
    Ok(body.trim().to_string())
}
