//! Compiles the .proto schemas with protox (pure Rust; no protoc binary).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/federation.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
