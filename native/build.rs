// Compiles the fio external ioengine (kiln_fio.c) against the headers of the installed
// fio, when they are present, and links it into libkiln_fio.so. The headers come from
// ci/fio-headers.sh (Debian's fio source package, configured) in target/fio-src, or from
// the configured fio source tree named by KILN_FIO_SRC. Without them the library holds
// only kiln's C ABI and fio cannot load it; one cargo warning says so.
use std::path::PathBuf;

fn main() {
    println!("cargo:rustc-check-cfg=cfg(kiln_fio_engine)");
    println!("cargo:rerun-if-changed=kiln_fio.c");
    println!("cargo:rerun-if-changed=kiln.h");
    println!("cargo:rerun-if-env-changed=KILN_FIO_SRC");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    // A relative KILN_FIO_SRC is relative to the repository root, as in ci/fio-headers.sh.
    let root = manifest.join("..");
    let fio_src = match std::env::var_os("KILN_FIO_SRC") {
        Some(dir) => root.join(dir),
        None => root.join("target/fio-src"),
    };
    let config = fio_src.join("config-host.h");
    println!("cargo:rerun-if-changed={}", config.display());
    if !fio_src.join("fio.h").exists() || !config.exists() {
        println!(
            "cargo:warning=fio external ioengine skipped: no configured fio source in {} \
             (run ci/fio-headers.sh, or set KILN_FIO_SRC to a configured fio source tree of \
             the installed fio version); libkiln_fio.so is built without it",
            fio_src.display()
        );
        return;
    }
    println!("cargo:rustc-cfg=kiln_fio_engine");
    cc::Build::new()
        .file("kiln_fio.c")
        .include(&manifest)
        .include(&fio_src)
        // As fio's own Makefile compiles its engines.
        .flag("-include")
        .flag(config.to_str().expect("fio source path is not UTF-8"))
        .flag("-std=gnu99")
        .define("_GNU_SOURCE", None)
        .define("_LARGEFILE_SOURCE", None)
        .define("_FILE_OFFSET_BITS", "64")
        .define("FIO_EXTERNAL_ENGINE", None)
        .warnings(true)
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-sign-compare")
        .flag_if_supported("-Wno-missing-field-initializers")
        .compile("kiln_fio_engine");
}
