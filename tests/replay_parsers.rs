//! Trace parsers and the replay harness on small traces the test writes itself.

use kiln::replay::policy::Policy;
use kiln::replay::trace::{load, TraceFormat};
use std::io::Write;

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-replay-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn u32_bytes(ids: &[u32]) -> Vec<u8> {
    ids.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn u32_plain_xz_and_zst() {
    let ids = [5u32, 7, 5, 9, 7, 5];
    let raw = u32_bytes(&ids);
    let p = tmp("t.u32");
    std::fs::write(&p, &raw).unwrap();
    let mut xz = xz2::write::XzEncoder::new(Vec::new(), 6);
    xz.write_all(&raw).unwrap();
    let px = tmp("t.u32.xz");
    std::fs::write(&px, xz.finish().unwrap()).unwrap();
    let pz = tmp("t.u32.zst");
    std::fs::write(&pz, zstd::encode_all(&raw[..], 3).unwrap()).unwrap();
    for path in [&p, &px, &pz] {
        let t = load(path, TraceFormat::U32, false).unwrap();
        assert_eq!(t.requests(), 6);
        assert_eq!(t.unique_pages(), 3);
        assert_eq!(t.raw_pages, vec![5, 7, 9]);
        assert_eq!(t.pages, vec![0, 1, 0, 2, 1, 0]);
    }
}

#[test]
fn arc_msr_csv_oracle() {
    let p = tmp("t.lis");
    std::fs::write(&p, "0 8 0 0\n7 2 0 1\n16 1 0 2\n").unwrap();
    let t = load(&p, TraceFormat::Arc, false).unwrap();
    assert_eq!(t.requests(), 3);
    assert_eq!(t.request(1), &[0, 1]); // blocks 7..8 touch pages 0 and 1
    let o = load(&p, TraceFormat::Arc, true).unwrap();
    assert_eq!(o.requests(), 4);

    let p = tmp("t.msr.csv");
    std::fs::write(&p, "1,hm,0,Write,8192,2048,1\n2,hm,0,Read,4000,200,1\n").unwrap();
    let t = load(&p, TraceFormat::Msr, false).unwrap();
    assert_eq!(t.requests(), 2);
    assert_eq!(t.raw_pages, vec![0, 1, 2]);
    assert_eq!(t.writes, vec![true, false]);

    let p = tmp("t.csv");
    std::fs::write(&p, "time,offset,size,op\n0,0,8192,R\n1,4096,4096,W\n").unwrap();
    let t = load(&p, TraceFormat::Csv, false).unwrap();
    assert_eq!((t.requests(), t.unique_pages()), (2, 2));
    assert_eq!(t.request(0).len(), 2);

    let mut rec = Vec::new();
    for (i, obj) in [10u64, 11, 10].iter().enumerate() {
        rec.extend((i as u32).to_le_bytes());
        rec.extend(obj.to_le_bytes());
        rec.extend(4096u32.to_le_bytes());
        rec.extend((-1i64).to_le_bytes());
    }
    let p = tmp("t.oracle.zst");
    std::fs::write(&p, zstd::encode_all(&rec[..], 1).unwrap()).unwrap();
    let t = load(&p, TraceFormat::Oracle, false).unwrap();
    assert_eq!(t.pages, vec![0, 1, 0]);
    let bad = tmp("bad.u32");
    std::fs::write(&bad, [1u8, 2, 3, 4, 5]).unwrap();
    assert!(load(&bad, TraceFormat::U32, false).is_err());
}

#[test]
fn demand_policies_hit_counts_and_belady_is_best() {
    // A looping pattern over 20 pages with a 10-page tier.
    let ids: Vec<u32> = (0..2000u32).map(|i| (i * 7 + i / 20) % 20).collect();
    let p = tmp("loop.u32");
    std::fs::write(&p, u32_bytes(&ids)).unwrap();
    let t = load(&p, TraceFormat::U32, true).unwrap();
    let args = <kiln_args::Wrap as clap::Parser>::parse_from(["x"]).a;
    let mut belady = 1.0;
    let mut others = Vec::new();
    for name in kiln::replay::POLICY_NAMES {
        let r = kiln::replay::run_one(&t, name, 0.5, &args).unwrap();
        assert_eq!(r.requests, 2000);
        assert!(r.miss_ratio > 0.0 && r.miss_ratio <= 1.0, "{name}");
        if name == "belady" {
            belady = r.miss_ratio;
        } else if !matches!(name, "markov" | "kiln") {
            others.push((name, r.miss_ratio));
        }
    }
    for (n, m) in others {
        assert!(belady <= m + 1e-9, "belady {belady} above {n} {m}");
    }
    let mut lru = kiln::replay::policy::Lru::new(3, 2);
    assert!(lru.access(0, 0) && lru.access(1, 1) && !lru.access(0, 2));
    assert!(lru.access(2, 3) && !lru.contains(1));
}

mod kiln_args {
    #[derive(clap::Parser)]
    pub struct Wrap {
        #[command(flatten)]
        pub a: kiln::replay::ReplayArgs,
    }
}
