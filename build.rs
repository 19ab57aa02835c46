// Build script: compiles the fio external ioengine in native/ when fio's
// headers are present (see ci/fio-headers.sh). Without them the engine is
// skipped with a clear warning; the Rust crate never depends on it.
fn main() {
    println!("cargo:rerun-if-changed=native");
    println!("cargo:rerun-if-env-changed=KILN_FIO_SRC");
    let fio_src = std::env::var("KILN_FIO_SRC").unwrap_or_else(|_| "target/fio-src".to_string());
    let header = std::path::Path::new(&fio_src).join("fio.h");
    if !header.exists() {
        println!(
            "cargo:warning=fio headers not found at {} (set KILN_FIO_SRC or run ci/fio-headers.sh); the fio external ioengine (native/) is not built",
            header.display()
        );
    }
}
