//! Compiles the .proto schemas with protox (pure Rust; no protoc binary):
//! the federation protocol with prost, the OpenIAP client protocol with
//! prost plus tonic's service code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let federation = ["proto/federation.proto"];
    // OpenIAP's files import each other by bare name ("querys.proto").
    let openiap = [
        "proto/openiap/ace.proto",
        "proto/openiap/base.proto",
        "proto/openiap/querys.proto",
        "proto/openiap/queues.proto",
        "proto/openiap/watch.proto",
        "proto/openiap/workitems.proto",
    ];
    for f in federation.iter().chain(&openiap) {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(federation, ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;

    let fds = protox::compile(["base.proto"], ["proto/openiap"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .generate_default_stubs(true)
        .compile_fds(fds)?;
    Ok(())
}
