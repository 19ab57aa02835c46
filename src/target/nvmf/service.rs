//! The NVMe/TCP service: listeners (one acceptor thread per address, started
//! on demand by configuration or RPC) that hand sockets to the reactors'
//! [`NvmfPoller`](super::NvmfPoller)s, and the SPDK-named RPC methods.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::Sender;
use serde_json::{json, Value};

use super::{NvmfMsg, NvmfShared};
use crate::reactor::ReactorHandle;

/// Connections above this many (over all listeners) are refused at accept.
pub const CONNECTIONS_MAX: usize = 1024;
const _: () = assert!(crate::config::NVMF_CONNECTIONS_MAX == CONNECTIONS_MAX);

pub struct NvmfService {
    pub shared: Arc<NvmfShared>,
    reactors: Vec<(ReactorHandle, Sender<NvmfMsg>)>,
    listeners: Mutex<Vec<(SocketAddr, std::thread::JoinHandle<()>)>>,
    stop: Arc<AtomicBool>,
}

impl NvmfService {
    pub fn new(
        shared: Arc<NvmfShared>,
        reactors: Vec<(ReactorHandle, Sender<NvmfMsg>)>,
    ) -> NvmfService {
        NvmfService {
            shared,
            reactors,
            listeners: Mutex::new(Vec::new()),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Starts listening on `addr` unless already listening there.
    pub fn listen(&self, addr: SocketAddr) -> Result<(), String> {
        let mut ls = self.listeners.lock().unwrap();
        if ls.iter().any(|(a, _)| *a == addr) {
            return Ok(());
        }
        let l = TcpListener::bind(addr).map_err(|e| format!("nvmf listen {addr}: {e}"))?;
        l.set_nonblocking(true)
            .map_err(|e| format!("nvmf listen {addr}: {e}"))?;
        let (reactors, stop, shared) = (
            self.reactors.clone(),
            self.stop.clone(),
            self.shared.clone(),
        );
        let h = std::thread::Builder::new()
            .name("kiln-nvmf-accept".into())
            .spawn(move || {
                let mut next = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let Ok((s, peer)) = l.accept() else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    let max = shared.max_connections;
                    if shared.live.fetch_add(1, Ordering::Relaxed) >= max {
                        shared.live.fetch_sub(1, Ordering::Relaxed);
                        tracing::warn!(%peer, "NVMe/TCP connection refused: {max} connections open (nvmf.max_connections)");
                        continue;
                    }
                    let (h, tx) = &reactors[next % reactors.len()];
                    next += 1;
                    let _ = tx.send(NvmfMsg::Connection {
                        fd: OwnedFd::from(s),
                        peer: peer.to_string(),
                        local: addr,
                    });
                    h.wake();
                }
            })
            .map_err(|e| e.to_string())?;
        tracing::info!("NVMe/TCP listening on {addr}");
        ls.push((addr, h));
        Ok(())
    }

    /// Stops accepting, then drains every reactor's poller.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        for (_, h) in self.listeners.lock().unwrap().drain(..) {
            let _ = h.join();
        }
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        for (h, tx) in &self.reactors {
            let _ = tx.send(NvmfMsg::Drain {
                done: done_tx.clone(),
            });
            h.wake();
        }
        for _ in 0..self.reactors.len() {
            if done_rx.recv_timeout(Duration::from_secs(30)).is_err() {
                tracing::warn!("an NVMe/TCP poller did not drain within 30 s");
                break;
            }
        }
    }

    /// The `nvmf_*` RPC methods; `None` when `method` is not one of them.
    pub fn rpc(&self, method: &str, params: &Value) -> Option<Result<Value, String>> {
        let reg = &self.shared.registry;
        let s = |k: &str| -> Result<String, String> {
            params
                .get(k)
                .and_then(|v| v.as_str())
                .map(|v| v.to_string())
                .ok_or_else(|| format!("missing string parameter '{k}'"))
        };
        let r = match method {
            "nvmf_get_subsystems" => {
                let mut list = vec![reg.discovery.to_json()];
                list.extend(reg.subsystems.lock().unwrap().iter().map(|s| s.to_json()));
                Ok(Value::Array(list))
            }
            "nvmf_create_subsystem" => (|| {
                let nqn = s("nqn")?;
                let serial = s("serial_number").unwrap_or_else(|_| "KILN00000000".into());
                let model = s("model_number").unwrap_or_else(|_| "kiln volume".into());
                let any = params
                    .get("allow_any_host")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false);
                reg.create_subsystem(&nqn, &serial, &model, any)?;
                Ok(json!(true))
            })(),
            "nvmf_subsystem_add_ns" => (|| {
                let nqn = s("nqn")?;
                let ns = params
                    .get("namespace")
                    .ok_or("missing object parameter 'namespace' ({\"bdev_name\": VOLUME})")?;
                let vol = ns
                    .get("bdev_name")
                    .and_then(|v| v.as_str())
                    .ok_or("namespace.bdev_name (a volume name) is required")?;
                let nsid = match ns.get("nsid") {
                    None => None,
                    Some(v) => Some(
                        v.as_u64()
                            .filter(|n| *n <= u32::MAX as u64)
                            .ok_or("namespace.nsid must be a number")?
                            as u32,
                    ),
                };
                Ok(json!(reg.add_ns(&nqn, vol, nsid)?))
            })(),
            "nvmf_subsystem_add_host" => (|| {
                reg.add_host(&s("nqn")?, &s("host")?)?;
                Ok(json!(true))
            })(),
            "nvmf_subsystem_add_listener" => (|| {
                let nqn = s("nqn")?;
                let la = params
                    .get("listen_address")
                    .ok_or("missing object parameter 'listen_address'")?;
                let tr = la.get("trtype").and_then(|v| v.as_str()).unwrap_or("tcp");
                if !tr.eq_ignore_ascii_case("tcp") {
                    return Err(format!("trtype '{tr}' is not supported (only TCP)"));
                }
                let ip = la
                    .get("traddr")
                    .and_then(|v| v.as_str())
                    .ok_or("listen_address.traddr is required")?;
                let port = la
                    .get("trsvcid")
                    .and_then(|v| {
                        v.as_str()
                            .map(|s| s.to_string())
                            .or_else(|| v.as_u64().map(|n| n.to_string()))
                    })
                    .unwrap_or_else(|| "4420".into());
                let addr: SocketAddr = format!("{ip}:{port}")
                    .parse()
                    .or_else(|_| format!("[{ip}]:{port}").parse())
                    .map_err(|_| format!("'{ip}:{port}' is not an IP address and port"))?;
                self.listen(addr)?;
                reg.add_listener(&nqn, addr)?;
                Ok(json!(true))
            })(),
            _ => return None,
        };
        if r.is_ok() && method != "nvmf_get_subsystems" {
            // Controllers holding Async Event Requests report the change; their
            // reactors may be parked.
            for (h, _) in &self.reactors {
                h.wake();
            }
        }
        Some(r)
    }
}

/// The RPC method names, for `rpc_get_methods`.
pub const RPC_METHODS: [&str; 5] = [
    "nvmf_create_subsystem",
    "nvmf_subsystem_add_ns",
    "nvmf_subsystem_add_listener",
    "nvmf_subsystem_add_host",
    "nvmf_get_subsystems",
];
