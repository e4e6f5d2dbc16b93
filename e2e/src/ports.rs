//! Free loopback ports. Binding :0 and closing leaves a small window in which another
//! process may take the port; the control plane retries start-up on such a collision.

use std::net::TcpListener;

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
