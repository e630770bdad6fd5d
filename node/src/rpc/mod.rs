//! gRPC: the node's three services ([`service`]) and the peer transport
//! ([`peer`]), plus [`serve`], which runs them on one listener.

pub mod liveness;
pub mod peer;
pub mod service;

use std::future::Future;

use kuberaft_proto::v1::admin_protocol_service_server::AdminProtocolServiceServer;
use kuberaft_proto::v1::raft_client_protocol_service_server::RaftClientProtocolServiceServer;
use kuberaft_proto::v1::raft_server_protocol_service_server::RaftServerProtocolServiceServer;
use tokio::net::TcpListener;

pub use service::Services;

/// Largest message a client may send (a write's payload plus framing).
/// Bigger requests are refused by gRPC with "message length too large".
pub const MAX_CLIENT_MESSAGE: usize = 16 << 20;

/// Serves all three services on `listener` until `shutdown` resolves.
pub async fn serve(
    services: Services,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    // Nagle's algorithm on the accepted sockets would hold a reply's last
    // small segment until the peer's delayed ACK (40 ms on Linux). The
    // builder's `tcp_nodelay` applies only to listeners it binds itself, so
    // the accepted sockets are set here.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .add_service(
            RaftClientProtocolServiceServer::new(services.clone())
                .max_decoding_message_size(MAX_CLIENT_MESSAGE),
        )
        .add_service(
            RaftServerProtocolServiceServer::new(services.clone())
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(AdminProtocolServiceServer::new(services))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
