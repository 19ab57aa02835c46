// Build script. native/ will hold the fio external ioengine, compiled here
// against fio's headers when they are present (KILN_FIO_SRC). Until its C
// source exists there is nothing to build and nothing to warn about.
fn main() {
    println!("cargo:rerun-if-changed=native");
    println!("cargo:rerun-if-env-changed=KILN_FIO_SRC");
    let source = std::path::Path::new("native/kiln_fio.c");
    if !source.exists() {
        return;
    }
    let fio_src = std::env::var("KILN_FIO_SRC").unwrap_or_else(|_| "target/fio-src".to_string());
    if !std::path::Path::new(&fio_src).join("fio.h").exists() {
        println!(
            "cargo:warning=fio headers not found in {fio_src} (set KILN_FIO_SRC); the fio external ioengine in native/ is not built"
        );
    }
}
