//! RPCs of object tiers: `tier_gc`, `policy_force_tier`, and the object
//! fields of `tier_list`. Kept apart from `server.rs`'s method table.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::policy::FORCE_NONE;
use crate::rpc::RpcError;
use crate::server::Shared;

fn tier_param(shared: &Shared, params: &Value) -> Result<usize, RpcError> {
    let name = params
        .get("tier")
        .and_then(|v| v.as_str())
        .ok_or_else(|| RpcError::invalid_params("missing string parameter 'tier'"))?;
    shared
        .tiers
        .iter()
        .position(|(n, _)| n == name)
        .ok_or_else(|| RpcError::invalid_params(format!("tier '{name}' not found")))
}

/// `tier_gc {"tier":"cold"}` and
/// `policy_force_tier {"tier":"cold"[,"object_size":"16MiB"][,"wait":true]}`.
pub fn handle(shared: &Shared, method: &str, params: &Value) -> Result<Value, RpcError> {
    let t = tier_param(shared, params)?;
    let (name, dev) = &shared.tiers[t];
    match method {
        "tier_gc" => {
            let o = dev.object_tier().ok_or_else(|| {
                RpcError::invalid_params(format!("tier '{name}' is not an object tier"))
            })?;
            let r = crate::migrate::tier_gc(&o, t as u8, &shared.meta_tx)
                .map_err(RpcError::internal)?;
            Ok(json!({"tier": name, "listed": r.listed, "deleted": r.deleted}))
        }
        _ => {
            let p = &shared.policy;
            let granules = match params.get("object_size").and_then(|v| v.as_str()) {
                None => crate::bdev::object::OBJECT_SPAN_GRANULES,
                Some(s) => {
                    let b = crate::units::parse_size(s).map_err(RpcError::invalid_params)?;
                    let g = crate::volume::journal::GRANULE_BYTES;
                    if b == 0 || b % g != 0 || b > crate::bdev::object::OBJECT_SPAN_BYTES {
                        return Err(RpcError::invalid_params(
                            "object_size must be a multiple of 64KiB up to 64MiB",
                        ));
                    }
                    b / g
                }
            };
            if dev.object_tier().is_some_and(|o| o.is_degraded()) {
                return Err(RpcError::internal(format!("tier '{name}' is degraded")));
            }
            let done = p.force_done.load(Ordering::Acquire);
            p.force_object_granules.store(granules, Ordering::Relaxed);
            if p.force_tier
                .compare_exchange(FORCE_NONE, t as u64, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                return Err(RpcError::internal("a forced placement is already running"));
            }
            if !params
                .get("wait")
                .and_then(|v| v.as_bool())
                .unwrap_or(false)
            {
                return Ok(json!({"tier": name, "started": true}));
            }
            let deadline = Instant::now() + Duration::from_secs(600);
            while p.force_done.load(Ordering::Acquire) == done {
                if Instant::now() > deadline {
                    return Err(RpcError::internal(
                        "forced placement still running after 600 s",
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            match p.force_error.lock().unwrap().clone() {
                Some(e) => Err(RpcError::internal(format!("forced placement stopped: {e}"))),
                None => Ok(json!({"tier": name, "done": true})),
            }
        }
    }
}

/// Fields `tier_list` adds for tier `t`: its kind, and for an object tier
/// its health and request counters. The device spec is shown redacted.
pub fn tier_fields(shared: &Shared, t: usize) -> Value {
    let (_, dev) = &shared.tiers[t];
    let spec = &shared.plan.tiers[t];
    let mut v = json!({
        "device": crate::bdev::spec::DeviceSpec::redacted(&spec.device),
        "cost_per_1k_get": spec.cost_per_1k_get,
        "cost_per_1k_put": spec.cost_per_1k_put,
        "kind": if dev.object_tier().is_some() { "object" } else { "block" },
    });
    if let Some(o) = dev.object_tier() {
        let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let s = &o.stats;
        v["degraded"] = json!(o.is_degraded());
        v["objects"] = json!({
            "gets": l(&s.gets), "get_bytes": l(&s.get_bytes), "puts": l(&s.puts),
            "put_bytes": l(&s.put_bytes), "multipart_puts": l(&s.multipart_puts),
            "deletes": l(&s.deletes), "errors": l(&s.errors), "crc_errors": l(&s.crc_errors),
        });
    }
    v
}
