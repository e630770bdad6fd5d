//! A faulty network between members, made of TCP proxies.
//!
//! Every member advertises the address of its proxy, so peers and clients
//! reach it through the proxy. Member `i` connects to its peers from its own
//! loopback address (`127.0.0.(10+i)`, the node's `--source-address`), which
//! is how a proxy tells which member a connection comes from; anything else
//! is a client and is never faulted.
//!
//! Each direction of each member pair (a *link*) is up, down (bytes are
//! dropped) or slow (bytes are held back for a while, in order). A link that
//! changes resets the connections across it, so a connection never carries
//! half a message into a new state: a down link behaves like a peer that
//! stopped answering, and a connection in the other direction across a
//! one-way fault still delivers requests but loses their replies.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What happens to bytes going from one member to another.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Link {
    #[default]
    Up,
    /// Bytes are dropped.
    Down,
    /// Bytes arrive this much later.
    Slow(Duration),
}

/// The loopback address member `i` connects from.
pub fn source_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + i as u8))
}

fn member_of(ip: IpAddr) -> Option<usize> {
    match ip {
        IpAddr::V4(v4) if v4.octets()[..3] == [127, 0, 0] && v4.octets()[3] >= 10 => {
            Some(v4.octets()[3] as usize - 10)
        }
        _ => None,
    }
}

#[derive(Debug, Default)]
struct State {
    links: HashMap<(usize, usize), Link>,
    /// Bumped when a link between the pair (either direction) changes;
    /// connections across the pair watch it and close.
    resets: HashMap<(usize, usize), watch::Sender<u64>>,
}

impl State {
    fn reset_of(&mut self, a: usize, b: usize) -> &watch::Sender<u64> {
        let pair = (a.min(b), a.max(b));
        self.resets
            .entry(pair)
            .or_insert_with(|| watch::channel(0).0)
    }
}

/// The proxies of a cluster and the state of every link.
#[derive(Clone, Debug, Default)]
pub struct Net {
    state: Arc<Mutex<State>>,
}

impl Net {
    /// Starts a proxy that forwards `listener`'s connections to member
    /// `to` at `upstream`.
    pub fn proxy(&self, listener: TcpListener, to: usize, upstream: SocketAddr) {
        let net = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((down, peer)) = listener.accept().await else {
                    // Out of descriptors, say: do not spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let from = member_of(peer.ip());
                tokio::spawn(net.clone().forward(down, from, to, upstream));
            }
        });
    }

    /// Sets the link `from` → `to`; connections across the pair reset.
    pub fn set(&self, from: usize, to: usize, link: Link) {
        let mut s = self.state.lock().expect("lock");
        let old = s.links.insert((from, to), link).unwrap_or_default();
        if old != link {
            s.reset_of(from, to).send_modify(|g| *g += 1);
        }
    }

    /// Every link up.
    pub fn heal(&self) {
        let pairs: Vec<(usize, usize)> = {
            let s = self.state.lock().expect("lock");
            s.links
                .iter()
                .filter(|(_, l)| **l != Link::Up)
                .map(|(p, _)| *p)
                .collect()
        };
        for (a, b) in pairs {
            self.set(a, b, Link::Up);
        }
    }

    fn link(&self, from: usize, to: usize) -> Link {
        let s = self.state.lock().expect("lock");
        s.links.get(&(from, to)).copied().unwrap_or_default()
    }

    async fn forward(self, down: TcpStream, from: Option<usize>, to: usize, upstream: SocketAddr) {
        let mut reset = from.map(|f| self.state.lock().expect("lock").reset_of(f, to).subscribe());
        let Ok(up) = TcpStream::connect(upstream).await else {
            return;
        };
        let _ = (down.set_nodelay(true), up.set_nodelay(true));
        let (down_r, down_w) = down.into_split();
        let (up_r, up_w) = up.into_split();
        // Client → member and member → client; a client connection has no
        // link (`None`) and is always up.
        let fwd = pump(self.clone(), down_r, up_w, from.map(|f| (f, to)));
        let back = pump(self.clone(), up_r, down_w, from.map(|f| (to, f)));
        let both = async {
            tokio::join!(fwd, back);
        };
        match &mut reset {
            Some(r) => {
                tokio::select! {
                    _ = both => {}
                    _ = r.changed() => {}
                }
            }
            None => both.await,
        }
    }
}

/// Copies `r` to `w` through the link, in order.
async fn pump(
    net: Net,
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    link: Option<(usize, usize)>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let state = link.map(|(a, b)| net.link(a, b)).unwrap_or_default();
            let due = match state {
                Link::Up => Instant::now(),
                Link::Down => continue,
                Link::Slow(d) => Instant::now() + d,
            };
            if tx.send((due, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if w.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(reader, writer);
}
