//! Data commands (put, get, delete, cas, scan, watch): one call each through
//! the client library, which finds the leader and retries within `--timeout`.
//! Each prints its outcome on one line; `get` of a missing key and a failed
//! compare-and-set exit non-zero, so scripts can test the status.

use anyhow::bail;
use kuberaft_proto::v1 as pb;

use super::{Cli, Cmd, client, text};

/// Runs a data command; `main` routes no other here.
pub(super) async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.cmd {
        Cmd::Put { key, value } => {
            let index = client(&cli)?.put(key.as_bytes(), value.as_bytes()).await?;
            println!("OK (index {index})");
            Ok(())
        }
        Cmd::Get { key } => match client(&cli)?.get(key.as_bytes()).await? {
            Some(v) => {
                println!("{}", text(&v));
                Ok(())
            }
            None => bail!("key {key:?} not found"),
        },
        Cmd::Delete { key } => {
            let existed = client(&cli)?.delete(key.as_bytes()).await?;
            println!("{}", if existed { "deleted" } else { "not found" });
            Ok(())
        }
        Cmd::Cas {
            key,
            expected,
            new,
            absent,
        } => {
            let exp = (!absent).then_some(expected.as_bytes());
            let (ok, current) = client(&cli)?
                .cas(key.as_bytes(), exp, new.as_bytes())
                .await?;
            if ok {
                println!("OK");
                Ok(())
            } else {
                let cur = current.map_or("(absent)".to_string(), |v| text(&v));
                bail!("compare failed: {key:?} holds {cur}")
            }
        }
        Cmd::Scan { prefix } => {
            for (k, v) in client(&cli)?.scan(prefix.as_bytes()).await? {
                println!("{}\t{}", text(&k), text(&v));
            }
            Ok(())
        }
        Cmd::Watch { index, level } => {
            let level = match level.as_str() {
                "all" => pb::ReplicationLevel::All,
                "majority-committed" => pb::ReplicationLevel::MajorityCommitted,
                "all-committed" => pb::ReplicationLevel::AllCommitted,
                _ => pb::ReplicationLevel::Majority,
            };
            client(&cli)?.watch(*index, level).await?;
            println!("index {index} reached {level:?}");
            Ok(())
        }
        _ => unreachable!("not a data command"),
    }
}
