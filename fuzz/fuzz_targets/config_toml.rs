//! Fuzzes the TOML config loader: `kiln::config::Config::parse` then `validate`, as
//! `kiln serve --config F` and `--check` run them, and the device-spec parser the tiers use.
//!
//! Input: the text of a config file (invalid UTF-8 replaced). Seeds: `configs/*.toml`; the
//! dictionary `fuzz/dict/config_toml.dict` holds the section names, keys and spec kinds.
//! Checks: no panic; an error names the file and is one line; validating twice gives the same
//! answer; a validated plan keeps the documented bounds.

#![no_main]

use kiln::bdev::spec::DeviceSpec;
use kiln::config::Config;
use libfuzzer_sys::fuzz_target;

const SOURCE: &str = "fuzz.toml";

fn one_line(e: &str) {
    assert!(e.starts_with("fuzz.toml: ") && !e.contains('\n'), "{e:?}");
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // The spec parser on its own, on arbitrary text.
    if let Err(e) = DeviceSpec::parse(&text) {
        assert!(!e.to_string().is_empty());
    }
    let config = match Config::parse(SOURCE, &text) {
        Ok(c) => c,
        Err(e) => return one_line(&e),
    };
    let plan = match config.validate(SOURCE) {
        Ok(p) => p,
        Err(e) => {
            one_line(&e);
            assert_eq!(config.validate(SOURCE).unwrap_err(), e);
            return;
        }
    };
    assert!(!plan.tiers.is_empty());
    for t in &plan.tiers {
        assert!(t.capacity_bytes > 0 && t.bandwidth_mib_s > 0);
        assert!(DeviceSpec::parse(&t.device).is_ok());
    }
    for v in &plan.volumes {
        assert!(v.chunk_bytes.is_power_of_two() && (64 << 10..=64 << 20).contains(&v.chunk_bytes));
        assert!(v.size_bytes > 0 && v.size_bytes % v.chunk_bytes == 0);
    }
    assert!(plan.nbd_max_payload_bytes.is_power_of_two());
    assert!((1..=1024).contains(&plan.nbd.max_queue_depth));
    for s in &plan.subsystems {
        assert!(s.namespaces.len() <= kiln::config::NAMESPACES_MAX);
        assert!(s
            .namespaces
            .iter()
            .all(|n| plan.volumes.iter().any(|v| &v.name == n)));
    }
});
