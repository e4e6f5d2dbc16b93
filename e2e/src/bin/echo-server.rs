//! The data-path suite's stand-in for a Pod's container: answers with its name.
//!
//! `echo-server --name NAME [--tcp PORT]... [--udp PORT]... [--listen ADDR]...`
//!
//! - TCP: reads what the client sends (up to a blank line or 1 KiB, at most 2 s), then
//!   writes `HTTP/1.0 200 OK` with the body `NAME\n` and closes; a plain TCP client
//!   sees the same bytes, an HTTP `GET /` a valid response.
//! - UDP: answers every datagram with `NAME\n`.
//!
//! Listens on `::` (both families) when the namespace has IPv6, else on `0.0.0.0`
//! (`--listen` overrides). It is started inside a Pod's network namespace with
//! `ip netns exec`, so its parent is the test process: it exits when that parent
//! dies (checked twice a second) or on SIGTERM/SIGKILL, so it never outlives a run.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

fn main() {
    let mut name = String::from("echo");
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    let mut listen: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_else(|| fail(&format!("{arg} needs a value")));
        match arg.as_str() {
            "--name" => name = value,
            "--tcp" => tcp.push(port(&value)),
            "--udp" => udp.push(port(&value)),
            "--listen" => listen.push(value),
            _ => fail(&format!("unknown argument {arg}")),
        }
    }
    if listen.is_empty() {
        // A socket on `::` also takes IPv4 (as mapped addresses) unless the sysctl
        // bindv6only is set, so one socket serves both families when IPv6 is there.
        let v6 = UdpSocket::bind("[::]:0").is_ok();
        listen.push(if v6 { "::" } else { "0.0.0.0" }.into());
    }
    let body = format!("{name}\n");
    for addr in &listen {
        for &p in &tcp {
            let sa = socket_addr(addr, p);
            let listener = TcpListener::bind(sa).unwrap_or_else(|e| fail(&format!("bind tcp {sa}: {e}")));
            let body = body.clone();
            std::thread::spawn(move || serve_tcp(listener, body));
        }
        for &p in &udp {
            let sa = socket_addr(addr, p);
            let socket = UdpSocket::bind(sa).unwrap_or_else(|e| fail(&format!("bind udp {sa}: {e}")));
            let body = body.clone();
            std::thread::spawn(move || serve_udp(socket, body));
        }
    }
    println!("echo-server {name} listening: tcp {tcp:?} udp {udp:?} on {listen:?}");
    let parent = std::os::unix::process::parent_id();
    // Not synchronisation: a liveness check so an orphaned server exits.
    loop {
        std::thread::sleep(Duration::from_millis(500));
        if std::os::unix::process::parent_id() != parent {
            return;
        }
    }
}

fn serve_tcp(listener: TcpListener, body: String) {
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    for stream in listener.incoming().flatten() {
        let response = response.clone();
        std::thread::spawn(move || answer(stream, response.as_bytes()));
    }
}

fn answer(mut stream: TcpStream, response: &[u8]) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let mut request = Vec::new();
    let mut buf = [0u8; 256];
    while request.len() < 1024 && !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let _ = stream.write_all(response);
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

fn serve_udp(socket: UdpSocket, body: String) {
    let mut buf = [0u8; 1500];
    loop {
        if let Ok((_, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(body.as_bytes(), peer);
        }
    }
}

fn socket_addr(addr: &str, port: u16) -> SocketAddr {
    let text = if addr.contains(':') { format!("[{addr}]:{port}") } else { format!("{addr}:{port}") };
    text.parse().unwrap_or_else(|e| fail(&format!("bad address {text}: {e}")))
}

fn port(value: &str) -> u16 {
    value.parse().unwrap_or_else(|e| fail(&format!("bad port {value}: {e}")))
}

fn fail(msg: &str) -> ! {
    eprintln!("echo-server: {msg}");
    std::process::exit(2)
}
