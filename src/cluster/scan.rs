//! Walking the keys that match a pattern (the response cache's purges):
//! `SCAN` sees one server's keys, so on a Redis Cluster every primary is
//! scanned in turn (`CLUSTER NODES` names them), and keys are unlinked in
//! groups of one slot (a cluster refuses one `UNLINK` across slots).

use std::collections::HashMap;

use redis::aio::ConnectionLike;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo, Slot};
use redis::{RedisError, Value};

use super::target::RedisConnection;

/// Where one `SCAN` goes: the connection's own server, or one primary of
/// a cluster (host, port).
pub type Node = Option<(String, u16)>;

/// The servers holding keys: `[None]` on a single Redis, each primary of a
/// cluster.
pub async fn primaries(con: &mut RedisConnection) -> Result<Vec<Node>, RedisError> {
    let RedisConnection::Cluster(c) = con else {
        return Ok(vec![None]);
    };
    let text: String = redis::from_redis_value(
        c.req_packed_command(&redis::cmd("CLUSTER").arg("NODES").clone())
            .await?,
    )?;
    Ok(cluster_primaries(&text).into_iter().map(Some).collect())
}

/// `CLUSTER NODES`' primaries not marked failed: each line is `id
/// host:port@cport[,hostname] flags ...`.
fn cluster_primaries(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (addr, flags) = (fields.nth(1)?, fields.next()?);
            let flags: Vec<&str> = flags.split(',').collect();
            if !flags.contains(&"master") || flags.iter().any(|f| f.starts_with("fail")) {
                return None;
            }
            let (host, port) = addr.split(['@', ',']).next()?.rsplit_once(':')?;
            Some((host.to_string(), port.parse().ok()?))
        })
        .collect()
}

/// `cmd` on `node`.
pub async fn query_on(con: &mut RedisConnection, node: &Node, cmd: &redis::Cmd) -> Result<Value, RedisError> {
    match (con, node) {
        (RedisConnection::Cluster(c), Some((host, port))) => {
            let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                host: host.clone(),
                port: *port,
            });
            c.route_command(cmd.clone(), route).await
        }
        (con, _) => con.req_packed_command(cmd).await,
    }
}

/// `keys` in groups of one slot, for one `UNLINK` each.
pub fn by_slot(keys: Vec<String>) -> Vec<Vec<String>> {
    let mut groups: HashMap<Slot, Vec<String>> = HashMap::new();
    for k in keys {
        groups.entry(Slot::for_key(&k)).or_default().push(k);
    }
    groups.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_names_its_live_primaries() {
        let text = "\
07c3 127.0.0.1:30004@40004 slave e7d1 0 1426238317239 4 connected
67ed 127.0.0.1:30002@40002 master - 0 1426238316232 2 connected 5461-10922
292f 127.0.0.1:30003@40003,node-3 master - 0 1426238318243 3 connected 10923-16383
6ec2 127.0.0.1:30005@40005 master,fail - 1426238316232 1426238315231 5 disconnected
e7d1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460
";
        assert_eq!(
            cluster_primaries(text),
            vec![
                ("127.0.0.1".to_string(), 30002),
                ("127.0.0.1".to_string(), 30003),
                ("127.0.0.1".to_string(), 30001)
            ]
        );
    }

    #[test]
    fn keys_of_one_tag_go_together() {
        let keys = ["a{t1}x", "b{t1}y", "c{t2}z"].map(String::from).to_vec();
        let mut groups = by_slot(keys);
        groups.sort();
        assert_eq!(
            groups,
            vec![vec!["a{t1}x".to_string(), "b{t1}y".into()], vec!["c{t2}z".into()]]
        );
    }
}
