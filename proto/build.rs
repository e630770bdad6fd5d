//! Compiles `proto/kuberaft/v1/*.proto` with protox (a pure-Rust protobuf
//! compiler), so building kuberaft never needs a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/kuberaft/v1/raft.proto",
        "proto/kuberaft/v1/statemachine.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".kuberaft.v1")
        .compile_fds(descriptors)?;
    Ok(())
}
