//! `kiln serve`: composes tiers, volumes, the metadata service, reactors,
//! NBD listeners, JSON-RPC and metrics, and shuts them down in order.
//!
//! Shutdown on SIGINT/SIGTERM: stop accepting, drain every reactor (finish
//! in-flight requests, flush replies), flush every tier, then write a final
//! journal checkpoint and say so.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use serde_json::{json, Value};

use crate::bdev::{self, BlockDevice};
use crate::config::{parse_listen, Config, Listen, NbdTls, Plan};
use crate::metrics::{Metrics, MetricsServer};
use crate::migrate::volume_move::{
    rpc_volume_migrate, MoveControl, MoveJob, MoveMode, MoveRpc, MoveStatus,
};
use crate::migrate::{MigrateTier, MigrationSettings, MigrationStats, Migrator};
use crate::policy::{PlanTier, PolicyShared};
use crate::reactor::{ReactorConfig, ReactorHandle, Reactors};
use crate::rpc::{RpcError, RpcServer};
use crate::target::nbd::{NbdLimits, NbdMsg, NbdPoller};
use crate::target::nbd_proto::{ExportInfo, HandshakeConfig};
use crate::target::nvmf::service::NvmfService;
use crate::target::nvmf::{NvmfPoller, NvmfShared};
use crate::volume::epoch::Epochs;
use crate::volume::io::VolumeIo;
use crate::volume::journal::{self, MetaRequest, MetaTier, TierUsage};
use crate::volume::tier_registry::TierRegistry;
use crate::volume::Volume;

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Configuration file (TOML). Without it, the embedded configs/default.toml is used.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Check the configuration and exit.
    #[arg(long)]
    pub check: bool,
}

/// Everything the control plane needs to answer RPCs.
pub struct Shared {
    pub plan: Plan,
    pub tiers: Vec<(String, Arc<dyn BlockDevice>)>,
    pub usage: Vec<Arc<TierUsage>>,
    pub volumes: Arc<Vec<Arc<Volume>>>,
    pub meta_tx: Sender<MetaRequest>,
    pub reactors: Vec<ReactorHandle>,
    pub nbd_connections: Arc<AtomicUsize>,
    pub policy: Arc<PolicyShared>,
    pub nvmf: Arc<NvmfService>,
    /// Every tier, including those added at run time (volume migration destinations).
    pub registry: Arc<TierRegistry>,
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local, zero-initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` holds blocked signals; sigwait stores the one received.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

/// The RPC method table.
pub fn handle_rpc(shared: &Shared, method: &str, params: Value) -> Result<Value, RpcError> {
    let volume_param = |params: &Value| -> Result<Arc<Volume>, RpcError> {
        let name = params
            .get("volume")
            .and_then(|v| v.as_str())
            .ok_or_else(|| RpcError::invalid_params("missing string parameter 'volume'"))?;
        shared
            .volumes
            .iter()
            .find(|v| v.name == name)
            .cloned()
            .ok_or_else(|| RpcError::invalid_params(format!("volume '{name}' not found")))
    };
    if let Some(r) = shared.nvmf.rpc(method, &params) {
        return r.map_err(RpcError::invalid_params);
    }
    match method {
        "kiln_get_version" => Ok(json!({"version": env!("CARGO_PKG_VERSION"), "name": "kiln"})),
        "rpc_get_methods" => {
            let mut m = json!([
                "kiln_get_version", "rpc_get_methods", "bdev_get_bdevs", "volume_list", "volume_get_map",
                "volume_iostat", "tier_list", "journal_checkpoint", "reactor_get_stats",
                "migration_get_status", "migration_set_priority", "policy_pause", "policy_resume",
                "volume_get_heatmap", "bdev_mirror_get_status", "bdev_mirror_replace",
                "bdev_error_inject", "volume_migrate", "volume_migrate_status", "tier_gc", "policy_force_tier"
            ]);
            let list = m.as_array_mut().expect("array");
            list.extend(crate::target::nvmf::service::RPC_METHODS.iter().map(|n| json!(n)));
            Ok(m)
        }
        "tier_gc" | "policy_force_tier" => crate::object_rpc::handle(shared, method, &params),
        "bdev_get_bdevs" => Ok(Value::Array(
            shared
                .tiers
                .iter()
                .map(|(tier, d)| {
                    let i = d.info();
                    let mirror = d.as_mirror().map(|m| json!(m.status()));
                    json!({
                        "name": i.name, "product_name": i.product, "tier": tier,
                        "block_size": i.block_size, "num_blocks": i.num_blocks,
                        "volatile_write_cache": i.volatile_write_cache, "mirror": mirror,
                    })
                })
                .collect(),
        )),
        "bdev_mirror_get_status" | "bdev_mirror_replace" => {
            let tier = params
                .get("tier")
                .and_then(|v| v.as_str())
                .ok_or_else(|| RpcError::invalid_params("missing string parameter 'tier'"))?;
            let dev = shared
                .tiers
                .iter()
                .find(|(t, _)| t == tier)
                .map(|(_, d)| d.clone())
                .ok_or_else(|| RpcError::invalid_params(format!("tier '{tier}' not found")))?;
            let mirror = dev.as_mirror().ok_or_else(|| {
                RpcError::invalid_params(format!("tier '{tier}' is not a mirror device"))
            })?;
            if method == "bdev_mirror_replace" {
                let leg = params.get("leg").and_then(|v| v.as_u64()).ok_or_else(|| {
                    RpcError::invalid_params("missing integer parameter 'leg' (0 or 1)")
                })?;
                let spec = params.get("spec").and_then(|v| v.as_str()).ok_or_else(|| {
                    RpcError::invalid_params("missing string parameter 'spec' (the new leg)")
                })?;
                if let Some(rate) = params.get("resync_mib_s").and_then(|v| v.as_u64()) {
                    mirror.set_resync_rate(rate);
                }
                let new = crate::bdev::open(spec)
                    .map_err(|e| RpcError::invalid_params(format!("new leg: {e}")))?;
                mirror
                    .replace(leg as usize, new)
                    .map_err(|e| RpcError::invalid_params(format!("tier '{tier}': {e}")))?;
            }
            Ok(json!(mirror.status()))
        }
        "bdev_error_inject" => {
            let name = params
                .get("name")
                .and_then(|v| v.as_str())
                .ok_or_else(|| RpcError::invalid_params("missing string parameter 'name'"))?;
            let on = params.get("enable").and_then(|v| v.as_bool()).unwrap_or(true);
            let touched = crate::bdev::error::set_enabled_matching(name, on);
            tracing::warn!(?touched, enabled = on, "fault injection switched by RPC");
            if touched.is_empty() {
                return Err(RpcError::invalid_params(format!(
                    "no error device has a name containing '{name}'"
                )));
            }
            Ok(json!({"devices": touched, "enabled": on}))
        }
        "volume_list" => Ok(Value::Array(
            shared
                .volumes
                .iter()
                .map(|v| {
                    let mapped: u64 = v.map.runs().iter().filter(|r| r.2.is_some()).map(|r| r.1).sum();
                    json!({
                        "name": v.name, "size_bytes": v.size_bytes, "chunk_bytes": v.chunk_bytes,
                        "mapped_bytes": mapped * v.map.granule_bytes,
                    })
                })
                .collect(),
        )),
        "volume_get_map" => {
            let v = volume_param(&params)?;
            let g = v.map.granule_bytes;
            let chunks: Vec<Value> = v
                .map
                .runs()
                .into_iter()
                .map(|(first, count, loc)| match loc {
                    Some(l) => json!({
                        "offset": first * g, "length": count * g,
                        "tier": shared.registry.name(l.tier as usize), "tier_offset": l.phys_granule * g,
                    }),
                    None => json!({"offset": first * g, "length": count * g, "tier": null}),
                })
                .collect();
            Ok(json!({"volume": v.name, "size_bytes": v.size_bytes, "granule_bytes": g, "chunks": chunks}))
        }
        "volume_iostat" => {
            let list: Vec<Value> = match params.get("volume") {
                Some(_) => vec![volume_param(&params)?],
                None => shared.volumes.iter().cloned().collect(),
            }
            .iter()
            .map(|v| {
                let mut s = v.stats.snapshot();
                s["volume"] = json!(v.name);
                s
            })
            .collect();
            Ok(Value::Array(list))
        }
        "tier_list" => Ok(Value::Array(
            shared
                .plan
                .tiers
                .iter()
                .zip(&shared.usage)
                .enumerate()
                .map(|(i, (t, u))| {
                    let mut v = json!({
                        "name": t.name,
                        "capacity_bytes": u.capacity_bytes.load(Ordering::Relaxed),
                        "used_bytes": u.used_bytes.load(Ordering::Relaxed),
                        "cost_per_gib_month": t.cost_per_gib_month,
                        "read_latency_us": t.read_latency_us, "write_latency_us": t.write_latency_us,
                        "bandwidth_mib_s": t.bandwidth_mib_s,
                    });
                    if let (Some(v), Value::Object(extra)) = (v.as_object_mut(), crate::object_rpc::tier_fields(shared, i)) {
                        v.extend(extra);
                    }
                    v
                })
                .collect(),
        )),
        "journal_checkpoint" => {
            let (tx, rx) = crossbeam_channel::bounded(1);
            shared.meta_tx.send(MetaRequest::Checkpoint { reply: tx }).map_err(|_| RpcError::internal("metadata service stopped"))?;
            let seq = rx
                .recv_timeout(Duration::from_secs(30))
                .map_err(|_| RpcError::internal("checkpoint timed out"))?
                .map_err(RpcError::internal)?;
            Ok(json!({"checkpoint_seq": seq}))
        }
        "migration_get_status" => {
            let mut v = shared.policy.stats.snapshot();
            v["policy"] = json!(shared.policy.kind);
            v["paused"] = json!(shared.policy.paused.load(Ordering::Relaxed));
            v["windows"] = json!(shared.policy.windows.load(Ordering::Relaxed));
            v["splits"] = json!(shared.policy.splits.load(Ordering::Relaxed));
            v["merges"] = json!(shared.policy.merges.load(Ordering::Relaxed));
            v["bursts"] = json!(shared.policy.bursts.load(Ordering::Relaxed));
            v["last_plan_moves"] = json!(shared.policy.last_plan_moves.load(Ordering::Relaxed));
            v["bandwidth_pct"] = json!(shared.policy.settings.bandwidth_pct.load(Ordering::Relaxed));
            v["queue_depth"] = json!(shared.policy.settings.queue_depth.load(Ordering::Relaxed));
            v["volume_moves"] = json!(shared.policy.moves.status(None));
            Ok(v)
        }
        "volume_migrate" => {
            let v = volume_param(&params)?;
            let ctx = MoveRpc {
                volume: &v,
                meta_tx: &shared.meta_tx,
                registry: &shared.registry,
                reactors: &shared.reactors,
                control: &shared.policy.moves,
            };
            rpc_volume_migrate(&ctx, &params).map_err(RpcError::invalid_params)
        }
        "volume_migrate_status" => {
            let name = params.get("volume").and_then(|v| v.as_str());
            let list = shared.policy.moves.status(name);
            match name {
                Some(n) => list.into_iter().next().ok_or_else(|| {
                    RpcError::invalid_params(format!("volume '{n}' has no migration"))
                }),
                None => Ok(Value::Array(list)),
            }
        }
        "migration_set_priority" => {
            let s = &shared.policy.settings;
            let mut changed = false;
            if let Some(b) = params.get("bandwidth_pct") {
                let b = b.as_u64().filter(|b| (1..=100).contains(b)).ok_or_else(|| RpcError::invalid_params("bandwidth_pct must be 1..100"))?;
                s.bandwidth_pct.store(b, Ordering::Relaxed);
                changed = true;
            }
            if let Some(q) = params.get("queue_depth") {
                let q = q.as_u64().filter(|q| (1..=16).contains(q)).ok_or_else(|| RpcError::invalid_params("queue_depth must be 1..16"))?;
                s.queue_depth.store(q, Ordering::Relaxed);
                changed = true;
            }
            if !changed {
                return Err(RpcError::invalid_params("give bandwidth_pct (1..100) and/or queue_depth (1..16)"));
            }
            Ok(json!({"bandwidth_pct": s.bandwidth_pct.load(Ordering::Relaxed), "queue_depth": s.queue_depth.load(Ordering::Relaxed)}))
        }
        "policy_pause" | "policy_resume" => {
            shared.policy.paused.store(method == "policy_pause", Ordering::Relaxed);
            Ok(json!({"paused": method == "policy_pause"}))
        }
        "volume_get_heatmap" => {
            let v = volume_param(&params)?;
            let windows = params.get("windows").and_then(|w| w.as_u64()).unwrap_or(1).clamp(1, crate::policy::HEAT_FRAMES_MAX as u64) as usize;
            let frames: Vec<_> = {
                let q = shared.policy.heat[v.id].lock().unwrap();
                q.iter().rev().take(windows).rev().cloned().collect()
            };
            let partitions = shared.policy.partitions[v.id].lock().unwrap().clone();
            Ok(json!({
                "volume": v.name,
                "size_bytes": v.size_bytes,
                "cell_bytes": shared.policy.cell_bytes[v.id],
                "tiers": shared.tiers.iter().map(|t| t.0.clone()).collect::<Vec<_>>(),
                "frames": frames,
                "partitions": partitions,
            }))
        }
        "reactor_get_stats" => Ok(Value::Array(
            shared
                .reactors
                .iter()
                .map(|h| {
                    json!({
                        "reactor": h.id, "core": h.core,
                        "loops": h.stats.loops.load(Ordering::Relaxed),
                        "parks": h.stats.parks.load(Ordering::Relaxed),
                        "messages": h.stats.messages.load(Ordering::Relaxed),
                    })
                })
                .collect(),
        )),
        _ => Err(RpcError::method_not_found(method)),
    }
}

/// Migration share of a runtime tier (it has no config entry).
const RUNTIME_TIER_BANDWIDTH_MIB_S: u64 = 1000;

/// Queues the volume moves the journal says are unfinished (a crash or a
/// shutdown interrupted them); chunks already switched are not copied again.
fn resume_volume_moves(
    moves: &[journal::VolumeMoveState],
    volumes: &[Arc<Volume>],
    registry: &TierRegistry,
    control: &MoveControl,
) {
    for m in moves.iter().filter(|m| !m.done) {
        let Some(v) = volumes.iter().find(|v| v.name == m.volume) else {
            tracing::warn!(volume = %m.volume, "unfinished move of a volume not in the config");
            continue;
        };
        let dest = registry.name(m.to_tier as usize).unwrap_or_default();
        let mode = MoveMode::from_u8(m.params.mode);
        let status = Arc::new(MoveStatus::new(&v.name, &dest, mode));
        let job = MoveJob::resumed(v.id, m.to_tier, &m.params, status);
        match control.submit(job) {
            Ok(()) => {
                tracing::info!(volume = %v.name, destination = %dest, mode = mode.name(), "resuming the volume migration from the journal")
            }
            Err(e) => tracing::warn!(volume = %v.name, "cannot resume the volume migration: {e}"),
        }
    }
}

fn spawn_acceptor(
    listen: Listen,
    reactors: Vec<(ReactorHandle, Sender<NbdMsg>)>,
    live: Arc<AtomicUsize>,
    max_connections: usize,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, String> {
    enum L {
        Tcp(std::net::TcpListener),
        Unix(UnixListener, PathBuf),
    }
    let listener = match &listen {
        Listen::Tcp(addr) => L::Tcp(
            std::net::TcpListener::bind(addr).map_err(|e| format!("nbd listen {addr}: {e}"))?,
        ),
        Listen::Unix(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("nbd listen {}: {e}", path.display()))?;
            }
            if path.exists() {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(format!(
                        "nbd listen {}: another server is listening there",
                        path.display()
                    ));
                }
                let _ = std::fs::remove_file(path);
            }
            L::Unix(
                UnixListener::bind(path)
                    .map_err(|e| format!("nbd listen {}: {e}", path.display()))?,
                path.clone(),
            )
        }
    };
    match &listener {
        L::Tcp(l) => l.set_nonblocking(true),
        L::Unix(l, _) => l.set_nonblocking(true),
    }
    .map_err(|e| e.to_string())?;
    tracing::info!("NBD listening on {listen:?}");
    let handle = std::thread::Builder::new()
        .name("kiln-accept".into())
        .spawn(move || {
            let mut next = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let accepted: Option<(OwnedFd, String)> = match &listener {
                    L::Tcp(l) => l.accept().ok().map(|(s, a)| (OwnedFd::from(s), a.to_string())),
                    L::Unix(l, p) => l.accept().ok().map(|(s, _)| (OwnedFd::from(s), format!("unix:{}", p.display()))),
                };
                let Some((fd, peer)) = accepted else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                if live.fetch_add(1, Ordering::Relaxed) >= max_connections {
                    live.fetch_sub(1, Ordering::Relaxed);
                    tracing::warn!(%peer, max_connections, "NBD connection refused: connection limit reached");
                    continue;
                }
                let (h, tx) = &reactors[next % reactors.len()];
                next += 1;
                let _ = tx.send(NbdMsg::Connection { fd, peer });
                h.wake();
            }
            if let L::Unix(_, p) = &listener {
                let _ = std::fs::remove_file(p);
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(handle)
}

/// Runs the server until SIGINT/SIGTERM. Returns the exit code.
pub fn serve(args: &ServeArgs) -> i32 {
    match serve_inner(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("kiln serve: error: {e}");
            1
        }
    }
}

fn serve_inner(args: &ServeArgs) -> Result<(), String> {
    crate::crashpoint::init_from_env()?;
    let (source, config) = Config::load(args.config.as_deref())?;
    let plan = config.validate(&source)?;
    let sigset = block_signals();
    // Devices.
    let mut tiers: Vec<(String, Arc<dyn BlockDevice>)> = Vec::new();
    for (i, t) in plan.tiers.iter().enumerate() {
        let dev = bdev::open(&t.device).map_err(|e| format!("{source}: tier[{i}].device: {e}"))?;
        if t.capacity_bytes > dev.info().size_bytes() {
            return Err(format!(
                "{source}: tier[{i}].capacity: {} is larger than the device {} ({})",
                crate::units::format_size(t.capacity_bytes),
                t.device,
                crate::units::format_size(dev.info().size_bytes())
            ));
        }
        if let Some(o) = dev.object_tier() {
            o.set_tier_name(&t.name);
        }
        tiers.push((t.name.clone(), dev));
    }
    let nbd_tls = match (plan.nbd.tls, &plan.nbd.tls_cert, &plan.nbd.tls_key) {
        (NbdTls::Off, _, _) => None,
        (_, Some(cert), Some(key)) => Some(
            crate::target::nbd_tls::server_config(Path::new(cert), Path::new(key))
                .map_err(|e| format!("{source}: {e}"))?,
        ),
        _ => unreachable!("config validation requires tls_cert and tls_key"),
    };
    if args.check {
        println!(
            "{source}: configuration is valid ({} tiers, {} volumes)",
            tiers.len(),
            plan.volumes.len()
        );
        return Ok(());
    }
    let volumes: Arc<Vec<Arc<Volume>>> = Arc::new(
        plan.volumes
            .iter()
            .enumerate()
            .map(|(i, v)| Arc::new(Volume::new(i, &v.name, v.size_bytes, v.chunk_bytes)))
            .collect(),
    );
    let usage: Vec<Arc<TierUsage>> = tiers
        .iter()
        .map(|_| Arc::new(TierUsage::default()))
        .collect();
    let meta_tiers = plan
        .tiers
        .iter()
        .zip(&tiers)
        .zip(&usage)
        .map(|((t, (_, d)), u)| MetaTier {
            name: t.name.clone(),
            device: d.clone(),
            capacity_bytes: t.capacity_bytes,
            usage: u.clone(),
        })
        .collect();
    let (meta_tx, meta_thread, st) = journal::start(meta_tiers, volumes.as_ref().clone())?;
    // Tiers added at run time by earlier volume migrations (journaled) join the list.
    let mut usage = usage;
    for t in &st.runtime_tiers {
        tiers.push((t.tier.name.clone(), t.device.clone()));
        usage.push(t.usage.clone());
    }
    tracing::info!(
        generation = st.generation,
        replayed = st.replayed_records,
        "journal open on tier '{}'",
        plan.tiers[0].name
    );
    let metrics = Arc::new(Metrics::with_version(env!("CARGO_PKG_VERSION")));
    for v in volumes.iter() {
        metrics.set_volume_size(&v.name, v.size_bytes);
    }
    // Reactors, each with an NBD poller.
    let rconfig = ReactorConfig {
        mode: plan.reactor.poll_mode,
        idle_spin_us: plan.reactor.idle_spin_us,
        dma_buf_bytes: plan.nbd_max_payload_bytes as usize,
        // NBD connections and the NVMe/TCP queues (up to 128 commands each) share the pool.
        dma_buf_count: (plan.nbd.max_queue_depth * 2).clamp(64, 1024) + 256,
    };
    let mut reactors =
        Reactors::start(&plan.reactor.cores, &rconfig).map_err(|e| format!("reactors: {e}"))?;
    let registry = Arc::new(TierRegistry::new(
        tiers.clone(),
        reactors.handles.len(),
        metrics.clone(),
    ));
    let exports: Vec<ExportInfo> = volumes
        .iter()
        .map(|v| ExportInfo {
            name: v.name.clone(),
            size_bytes: v.size_bytes,
            block_size_min: 512,
            block_size_preferred: 4096,
            block_size_max: plan.nbd_max_payload_bytes,
            read_only: false,
            multi_conn: true,
            description: format!("kiln volume {}", v.name),
        })
        .collect();
    for e in &exports {
        e.validate().map_err(|e| e.to_string())?;
    }
    let hs_config = Arc::new(HandshakeConfig {
        exports,
        tls_required: plan.nbd.tls == NbdTls::Required,
        tls_available: plan.nbd.tls != NbdTls::Off,
    });
    let limits = NbdLimits {
        max_queue_depth: plan.nbd.max_queue_depth,
        max_payload_bytes: plan.nbd_max_payload_bytes,
        max_inflight_bytes: plan.nbd_max_inflight_bytes,
    };
    let live = Arc::new(AtomicUsize::new(0));
    let epochs = Arc::new(Epochs::new(reactors.handles.len()));
    // Two heat recorders per reactor: its NBD engine's and its NVMe/TCP engine's.
    let n_reactors = reactors.handles.len();
    let (samplers, mut recorders) = crate::policy::heat_samplers(&volumes, n_reactors * 2);
    let subsystems = Arc::new(crate::target::nvmf::ctrl::Registry::new(volumes.clone()));
    for s in &plan.subsystems {
        subsystems
            .add_spec(s)
            .map_err(|e| format!("{source}: subsystem {}: {e}", s.nqn))?;
    }
    let nvmf_shared = Arc::new(NvmfShared {
        registry: subsystems,
        max_io_bytes: plan.nbd_max_payload_bytes,
        live: AtomicUsize::new(0),
        max_connections: plan.nvmf.max_connections,
    });
    let mut nvmf_inboxes = Vec::new();
    // Writes to object-resident data (and, under the synchronous demand policy, reads
    // of data off the fastest tier) wait for the policy thread to promote it.
    let (promote_tx, promote_rx) = crossbeam_channel::unbounded();
    let settings = Arc::new(MigrationSettings::default());
    let mut inboxes = Vec::new();
    for (ri, h) in reactors.handles.iter().enumerate() {
        let (ep, recs) = (epochs.clone(), std::mem::take(&mut recorders[ri]));
        let nvmf_recs = std::mem::take(&mut recorders[n_reactors + ri]);
        let (nvmf_tx, nvmf_rx) = crossbeam_channel::unbounded();
        let nvmf_sh = nvmf_shared.clone();
        let reg = registry.clone();
        let (tx, rx) = crossbeam_channel::unbounded();
        let tls = nbd_tls.clone();
        let (vols, tiers_c, meta, hs, lim, lv, handle, m) = (
            volumes.clone(),
            tiers.clone(),
            meta_tx.clone(),
            hs_config.clone(),
            limits.clone(),
            live.clone(),
            h.clone(),
            metrics.clone(),
        );
        let (ok_tx, ok_rx) = crossbeam_channel::bounded(1);
        let ptx = promote_tx.clone();
        let demand = settings.clone();
        h.send(move |r| {
            let slab = (lim.max_queue_depth * 16).max(256);
            let engines = VolumeIo::new(
                vols.clone(),
                &tiers_c,
                &r.pool,
                &m,
                slab,
                meta.clone(),
                Some(handle.clone()),
            )
            .and_then(|a| {
                let slab = NvmfPoller::ENGINE_SLAB;
                VolumeIo::new(vols, &tiers_c, &r.pool, &m, slab, meta, Some(handle)).map(|b| (a, b))
            });
            match engines {
                Ok((mut io, mut nvmf_io)) => {
                    io.set_epochs(ep.clone(), ri);
                    io.set_tier_registry(reg.clone());
                    nvmf_io.set_tier_registry(reg);
                    io.set_promoter(ptx.clone());
                    nvmf_io.set_promoter(ptx);
                    io.set_demand_reads(demand.clone());
                    nvmf_io.set_demand_reads(demand);
                    for (vi, rec) in recs.into_iter().enumerate() {
                        io.set_heat(vi, rec);
                    }
                    nvmf_io.set_epochs(ep, ri);
                    for (vi, rec) in nvmf_recs.into_iter().enumerate() {
                        nvmf_io.set_heat(vi, rec);
                    }
                    r.add_poller(Box::new(NbdPoller::new(io, rx, hs, lim, tls, lv)));
                    r.add_poller(Box::new(NvmfPoller::new(nvmf_io, nvmf_rx, nvmf_sh)));
                    let _ = ok_tx.send(Ok(()));
                }
                Err(e) => {
                    let _ = ok_tx.send(Err(e));
                }
            }
        });
        ok_rx.recv().map_err(|_| "reactor died".to_string())??;
        inboxes.push((h.clone(), tx));
        nvmf_inboxes.push((h.clone(), nvmf_tx));
    }
    let nvmf = Arc::new(NvmfService::new(nvmf_shared.clone(), nvmf_inboxes));
    for s in &plan.subsystems {
        for l in &s.listeners {
            nvmf.listen(*l)?;
        }
    }
    // Listeners.
    let stop = Arc::new(AtomicBool::new(false));
    let mut acceptors = Vec::new();
    for l in &plan.nbd.listen {
        let listen = parse_listen(l)?;
        acceptors.push(spawn_acceptor(
            listen,
            inboxes.clone(),
            live.clone(),
            plan.nbd.max_connections,
            stop.clone(),
        )?);
    }
    // The policy loop and its migration engine.
    let mstats = Arc::new(MigrationStats::default());
    let tiers_for_plan = &tiers;
    let plan_tiers: Vec<PlanTier> = plan
        .tiers
        .iter()
        .zip(&usage)
        .enumerate()
        .map(|(i, (t, u))| PlanTier {
            name: t.name.clone(),
            read_latency_us: t.read_latency_us,
            write_latency_us: t.write_latency_us,
            bandwidth_mib_s: t.bandwidth_mib_s,
            cost_per_gib_month: t.cost_per_gib_month,
            usage: u.clone(),
            cost_per_1k_get: t.cost_per_1k_get,
            cost_per_1k_put: t.cost_per_1k_put,
            object: tiers_for_plan[i].1.object_tier(),
        })
        .collect();
    let mut mtiers: Vec<MigrateTier> = plan
        .tiers
        .iter()
        .zip(&tiers)
        .map(|(t, (_, d))| MigrateTier {
            name: t.name.clone(),
            device: d.clone(),
            bandwidth_mib_s: t.bandwidth_mib_s,
        })
        .collect();
    mtiers.extend(st.runtime_tiers.iter().map(|t| MigrateTier {
        name: t.tier.name.clone(),
        device: t.device.clone(),
        bandwidth_mib_s: RUNTIME_TIER_BANDWIDTH_MIB_S,
    }));
    let (v2, m2, e2, s2, st2) = (
        volumes.clone(),
        meta_tx.clone(),
        epochs.clone(),
        settings.clone(),
        mstats.clone(),
    );
    let mut policy = crate::policy::start_with_objects(
        plan.policy.clone(),
        volumes.clone(),
        plan_tiers,
        samplers,
        settings,
        mstats,
        move || Migrator::new(v2, mtiers, m2, e2, s2, st2),
        Some(promote_rx),
    )?;
    tracing::info!(policy = ?plan.policy.policy, interval_ms = plan.policy.interval_ms, "policy loop started");
    resume_volume_moves(&st.moves, &volumes, &registry, &policy.shared.moves);
    let shared = Arc::new(Shared {
        registry: registry.clone(),
        plan: plan.clone(),
        tiers: tiers.clone(),
        usage: usage.clone(),
        volumes: volumes.clone(),
        meta_tx: meta_tx.clone(),
        reactors: reactors.handles.clone(),
        nbd_connections: live.clone(),
        policy: policy.shared.clone(),
        nvmf: nvmf.clone(),
    });
    let mut rpc = match &plan.rpc_socket {
        Some(path) => {
            let s2 = shared.clone();
            let server = RpcServer::start(
                Path::new(path),
                Arc::new(move |m: &str, p: Value| handle_rpc(&s2, m, p)),
            )
            .map_err(|e| format!("rpc socket {path}: {e}"))?;
            tracing::info!("JSON-RPC on {path}");
            Some(server)
        }
        None => None,
    };
    // Metrics: gauges refreshed by a small thread.
    let mut metrics_server = match &plan.metrics_listen {
        Some(addr) => {
            let server = MetricsServer::start(addr, metrics.clone(), false)
                .map_err(|e| format!("metrics listen {addr}: {e}"))?;
            tracing::info!("metrics on http://{}/metrics", server.local_addr());
            Some(server)
        }
        None => None,
    };
    let gauge_stop = stop.clone();
    let (m2, s3, journal) = (metrics.clone(), shared.clone(), st.stats.clone());
    let gauges = std::thread::Builder::new()
        .name("kiln-gauges".into())
        .spawn(move || {
            let conns = m2.nbd_connections();
            while !gauge_stop.load(Ordering::Relaxed) {
                for (t, u) in s3.plan.tiers.iter().zip(&s3.usage) {
                    m2.set_tier_usage(
                        &t.name,
                        u.capacity_bytes.load(Ordering::Relaxed),
                        u.used_bytes.load(Ordering::Relaxed),
                    );
                }
                for (t, d) in &s3.tiers {
                    if let Some(m) = d.as_mirror() {
                        let st = m.status();
                        m2.set_mirror_health(t, st.degraded, st.resync_done_bytes);
                    }
                }
                for (name, d) in &s3.tiers {
                    if let Some(o) = d.object_tier() {
                        m2.set_tier_degraded(name, o.is_degraded());
                    }
                }
                m2.set_journal_status(
                    journal.misdirected_writes.load(Ordering::Relaxed),
                    journal.failed.load(Ordering::Relaxed),
                );
                conns.set(s3.nbd_connections.load(Ordering::Relaxed) as i64);
                std::thread::sleep(Duration::from_millis(500));
            }
        })
        .map_err(|e| e.to_string())?;
    tracing::info!(
        "kiln serving {} volume(s) on {} reactor(s); stop with Ctrl-C",
        volumes.len(),
        reactors.handles.len()
    );
    let sig = wait_signal(&sigset);
    tracing::info!(signal = sig, "shutting down: draining connections");
    stop.store(true, Ordering::Relaxed);
    for a in acceptors {
        let _ = a.join();
    }
    let _ = gauges.join();
    nvmf.shutdown();
    policy.stop();
    let (done_tx, done_rx) = crossbeam_channel::unbounded();
    for (h, tx) in &inboxes {
        let _ = tx.send(NbdMsg::Drain {
            done: done_tx.clone(),
        });
        h.wake();
    }
    for _ in 0..inboxes.len() {
        if done_rx.recv_timeout(Duration::from_secs(30)).is_err() {
            tracing::warn!("a reactor did not drain within 30 s");
            break;
        }
    }
    reactors.shutdown();
    if let Some(r) = rpc.as_mut() {
        r.stop();
    }
    if let Some(m) = metrics_server.as_mut() {
        m.stop();
    }
    // Flush tiers, then the final checkpoint.
    for (name, d) in &tiers {
        if let Ok(mut ch) = d.open_channel(&bdev::ChannelOptions {
            queue_depth: 1,
            pool: None,
        }) {
            // SAFETY: a flush carries no buffer.
            let rc = unsafe { bdev::submit_and_wait(ch.as_mut(), &bdev::IoRequest::flush(0)) };
            if rc != 0 {
                tracing::error!(tier = %name, "flush failed: {}", std::io::Error::from_raw_os_error(-rc));
            }
        }
    }
    let (tx, rx) = crossbeam_channel::bounded(1);
    let _ = meta_tx.send(MetaRequest::Shutdown { reply: tx });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(seq)) => tracing::info!(
            checkpoint_seq = seq,
            "journal flushed: final checkpoint written; clean shutdown"
        ),
        Ok(Err(e)) => tracing::error!(
            "final checkpoint failed: {e}; the journal will be replayed at next start"
        ),
        Err(_) => tracing::error!(
            "metadata service did not answer; the journal will be replayed at next start"
        ),
    }
    let _ = meta_thread.join();
    Ok(())
}
