// Build script of the kiln crate. It has nothing to generate: the C code in native/
// (the fio external ioengine) is compiled by native/build.rs into libkiln_fio.so.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
