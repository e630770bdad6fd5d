//! The generated protocol: messages survive a round trip through the wire
//! format, and the three services exist under their versioned names with the
//! RPCs the design lists.

use bytes::Bytes;
use kuberaft_proto::v1::*;
use prost::Message;

#[test]
fn client_request_with_oneof_round_trips() {
    let req = ClientRequest {
        group_id: Some(GroupId {
            id: Bytes::from_static(b"g1"),
        }),
        client_id: Bytes::from_static(b"client"),
        call_id: 7,
        sequence_number: 3,
        kind: Some(client_request::Kind::Watch(WatchRequest {
            index: 42,
            level: ReplicationLevel::AllCommitted as i32,
        })),
        ..Default::default()
    };
    let decoded = ClientRequest::decode(req.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded, req);
}

#[test]
fn append_entries_carries_entries_and_typed_reply() {
    let req = AppendEntriesRequest {
        leader_term: 5,
        previous: Some(TermIndex { term: 4, index: 9 }),
        entries: vec![
            LogEntry {
                term: 5,
                index: 10,
                payload: Some(log_entry::Payload::NoOp(NoOp {})),
            },
            LogEntry {
                term: 5,
                index: 11,
                payload: Some(log_entry::Payload::Command(Bytes::from_static(b"put k v"))),
            },
        ],
        leader_commit: 9,
        ..Default::default()
    };
    assert_eq!(
        AppendEntriesRequest::decode(req.encode_to_vec().as_slice()).unwrap(),
        req
    );
    let reply = AppendEntriesReply {
        result: AppendResult::Inconsistency as i32,
        next_index: 7,
        conflict_term: 3,
        ..Default::default()
    };
    let back = AppendEntriesReply::decode(reply.encode_to_vec().as_slice()).unwrap();
    assert_eq!(back.result(), AppendResult::Inconsistency);
}

#[test]
fn malformed_bytes_are_an_error_not_a_panic() {
    let garbage = [
        0xff_u8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
    ];
    assert!(ClientRequest::decode(&garbage[..]).is_err());
}

#[test]
fn services_have_versioned_names() {
    use tonic::server::NamedService;
    type Client = raft_client_protocol_service_server::RaftClientProtocolServiceServer<()>;
    type Server = raft_server_protocol_service_server::RaftServerProtocolServiceServer<()>;
    type Admin = admin_protocol_service_server::AdminProtocolServiceServer<()>;
    assert_eq!(
        <Client as NamedService>::NAME,
        "kuberaft.v1.RaftClientProtocolService"
    );
    assert_eq!(
        <Server as NamedService>::NAME,
        "kuberaft.v1.RaftServerProtocolService"
    );
    assert_eq!(
        <Admin as NamedService>::NAME,
        "kuberaft.v1.AdminProtocolService"
    );
}
