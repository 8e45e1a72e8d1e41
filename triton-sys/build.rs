//! Generates FFI bindings for the Triton backend API.
//!
//! Headers come from `$TRITON_INCLUDE_DIR`, else `/opt/tritonserver/include` (present
//! in the NGC container), else the unmodified r24.10 copy vendored in this crate.
//! Nothing is linked: the symbols resolve when `tritonserver` dlopens the backend.

use std::env;
use std::path::{Path, PathBuf};

/// Entry points the backend itself defines; declaring them here would clash.
const BACKEND_ENTRY_POINTS: &str = "TRITONBACKEND_(Initialize|Finalize|GetBackendAttribute|ModelInitialize|ModelFinalize|ModelInstanceInitialize|ModelInstanceFinalize|ModelInstanceExecute|ModelInstanceReady)";

fn include_dir() -> PathBuf {
    if let Some(dir) = env::var_os("TRITON_INCLUDE_DIR") {
        return PathBuf::from(dir);
    }
    let system = Path::new("/opt/tritonserver/include");
    if system.join("triton/core/tritonbackend.h").is_file() {
        return system.to_path_buf();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("third_party/triton-core-r24.10/include")
}

fn main() {
    println!("cargo:rerun-if-env-changed=TRITON_INCLUDE_DIR");
    println!("cargo:rerun-if-changed=wrapper.h");
    let include = include_dir();
    let backend_header = include.join("triton/core/tritonbackend.h");
    assert!(
        backend_header.is_file(),
        "Triton headers not found: {} does not exist (set TRITON_INCLUDE_DIR)",
        backend_header.display()
    );
    println!("cargo:rerun-if-changed={}", backend_header.display());
    println!("cargo:include={}", include.display());

    let bindings = bindgen::Builder::default()
        .header("wrapper.h")
        // The headers only parse as C++.
        .clang_args(["-x", "c++", "-std=c++14"])
        .clang_arg(format!("-I{}", include.display()))
        .allowlist_function("TRITON(BACKEND|SERVER)_.*")
        .allowlist_type("TRITON(BACKEND|SERVER)_.*")
        .allowlist_var("TRITON(BACKEND|SERVER)_.*")
        .blocklist_function(BACKEND_ENTRY_POINTS)
        // C enums become plain integer constants: a value unknown to these
        // bindings must never be transmuted into a Rust enum.
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        .layout_tests(false)
        .generate_comments(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .generate()
        .expect("bindgen failed on the Triton headers");

    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("writing bindings.rs");
}
