//! Fault injection: a TCP proxy between a process under test (svcplane) and
//! kube-apiserver that can cut every open connection and refuse new ones, then
//! restore. TLS passes through untouched: the proxy listens on 127.0.0.1, which the
//! apiserver's serving certificate names, so the client verifies the apiserver's
//! certificate as if it dialled it directly.
//!
//! The proxy runs on its own thread and tokio runtime, so it keeps relaying while a
//! test blocks, and outlives the runtime of the test that started it; it stops
//! (closing every connection) on drop.
//!
//! The other fault, restarting kube-apiserver or etcd under a running svcplane,
//! is [`ControlPlane::stop_for_restart`] and [`ControlPlane::start_again`].

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

use crate::{controlplane::ControlPlane, svcplane::Svcplane, wait::poll_until};

/// Whether the proxy relays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// New connections are relayed.
    Open,
    /// Open connections are closed; new ones are closed at once, before a byte is
    /// relayed.
    Cut,
    /// The proxy is being dropped.
    Stopped,
}

/// A running proxy to one upstream address.
pub struct FaultProxy {
    /// `127.0.0.1:PORT`, where clients connect.
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    relaying: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (`host:port`, or an `https://host:port` URL such
    /// as [`ControlPlane::server`]), open.
    pub fn start(upstream: &str) -> std::io::Result<Self> {
        let upstream = upstream.trim_start_matches("https://").trim_end_matches('/').to_string();
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (mode, modes) = watch::channel(Mode::Open);
        let relaying = Arc::new(AtomicUsize::new(0));
        let counter = relaying.clone();
        let thread =
            std::thread::Builder::new().name(format!("fault-proxy-{}", addr.port())).spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                    return;
                };
                rt.block_on(serve(listener, upstream, modes, counter));
            })?;
        Ok(Self { addr, mode, relaying, thread: Some(thread) })
    }

    /// Closes every open connection and refuses new ones until [`Self::restore`];
    /// returns once no connection is relayed any more, with how many were cut.
    /// Panics if connections stay open for 10s.
    pub async fn cut(&self) -> usize {
        let open = self.relaying.load(Ordering::Acquire);
        self.mode.send_replace(Mode::Cut);
        poll_until(Duration::from_secs(10), Duration::from_millis(10), || async {
            Ok(self.relaying.load(Ordering::Acquire) == 0)
        })
        .await
        .unwrap_or_else(|e| panic!("fault proxy {}: connections still open after the cut: {e}", self.addr));
        open
    }

    /// Relays new connections again.
    pub fn restore(&self) {
        self.mode.send_replace(Mode::Open);
    }

    /// Connections relayed right now.
    pub fn open_connections(&self) -> usize {
        self.relaying.load(Ordering::Acquire)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.mode.send_replace(Mode::Stopped);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Accepts until stopped; each connection relays until it ends or the proxy is cut.
async fn serve(
    listener: std::net::TcpListener,
    upstream: String,
    modes: watch::Receiver<Mode>,
    relaying: Arc<AtomicUsize>,
) {
    let Ok(listener) = TcpListener::from_std(listener) else { return };
    let mut stop = modes.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|m| *m == Mode::Stopped) => return,
        };
        let Ok((mut client, _)) = accepted else { continue };
        if *modes.borrow() != Mode::Open {
            drop(client);
            continue;
        }
        let (mut cut, upstream, relaying) = (modes.clone(), upstream.clone(), relaying.clone());
        relaying.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(async move {
            if let Ok(mut server) = TcpStream::connect(&upstream).await {
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    _ = cut.wait_for(|m| *m != Mode::Open) => {}
                }
            }
            // Both sockets are closed here, when `client` and `server` drop.
            drop(client);
            relaying.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

impl ControlPlane {
    /// Writes a copy of the admin kubeconfig whose server is `proxy` (same CA, same
    /// client certificate) and returns its path.
    pub fn write_kubeconfig_through(&self, name: &str, proxy: &FaultProxy) -> std::io::Result<PathBuf> {
        let admin = std::fs::read_to_string(&self.kubeconfig_path)?;
        let server = format!("server: {}\n", self.server);
        if !admin.contains(&server) {
            return Err(std::io::Error::other(format!(
                "{} does not name the server {}",
                self.kubeconfig_path.display(),
                self.server
            )));
        }
        let path = self.dir().join(format!("kubeconfig-{name}"));
        std::fs::write(&path, admin.replace(&server, &format!("server: https://{}\n", proxy.addr)))?;
        Ok(path)
    }

    /// Like [`ControlPlane::svcplane`], connected to the apiserver through `proxy`.
    pub async fn svcplane_through(&self, name: &str, proxy: &FaultProxy, args: &[&str]) -> Svcplane {
        let kubeconfig = self
            .write_kubeconfig_through(&format!("svcplane-{name}"), proxy)
            .unwrap_or_else(|e| panic!("kubeconfig through the fault proxy: {e}"));
        self.svcplane_with_kubeconfig(name, &kubeconfig, args).await
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// An echo server on loopback; returns its address.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = conn.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn echo_once(conn: &mut TcpStream) -> std::io::Result<Vec<u8>> {
        conn.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).await?;
        Ok(buf.to_vec())
    }

    #[tokio::test]
    async fn relays_then_cuts_and_refuses_then_relays_again() {
        let proxy = FaultProxy::start(&echo_server().await.to_string()).expect("proxy");
        let mut before = TcpStream::connect(proxy.addr).await.expect("connect");
        assert_eq!(echo_once(&mut before).await.expect("relayed"), b"ping");

        assert_eq!(proxy.cut().await, 1, "the open connection is cut");
        let mut buf = Vec::new();
        let read = before.read_to_end(&mut buf).await;
        assert!(read.is_err() || buf.is_empty(), "a cut connection ends: {read:?}");
        let mut during = TcpStream::connect(proxy.addr).await.expect("the port still accepts");
        assert!(echo_once(&mut during).await.is_err(), "a new connection is refused while cut");

        proxy.restore();
        let mut after = TcpStream::connect(proxy.addr).await.expect("connect");
        assert_eq!(echo_once(&mut after).await.expect("relayed again"), b"ping");
        assert_eq!(proxy.open_connections(), 1);
    }
}
