//! Where a channel lives: one Redis server, or (with `--redis-sharded`) the Redis Cluster
//! master that owns the channel's hash slot, so a room's traffic touches only its shard
//! (`SPUBLISH`/`SSUBSCRIBE`; classic `PUBLISH` in a cluster is copied to every node).

use redis::Value;

/// A key's hash slot (CRC16/XMODEM of the key, or of its `{hash tag}`, modulo 16384).
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key);
    crc16(tagged) % 16384
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Which server serves which channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    /// One server for everything (plain pub/sub).
    Single(String),
    /// Slot ranges and the `redis://host:port` of their master.
    Cluster(Vec<(u16, u16, String)>),
}

impl Topology {
    /// The servers to hold connections to.
    pub fn servers(&self) -> Vec<String> {
        match self {
            Topology::Single(url) => vec![url.clone()],
            Topology::Cluster(ranges) => {
                let mut all: Vec<String> = ranges.iter().map(|r| r.2.clone()).collect();
                all.sort();
                all.dedup();
                all
            }
        }
    }

    /// The server that serves `channel` (index into [`Topology::servers`]).
    pub fn owner(&self, channel: &str) -> usize {
        match self {
            Topology::Single(_) => 0,
            Topology::Cluster(ranges) => {
                let s = slot(channel.as_bytes());
                let servers = self.servers();
                ranges
                    .iter()
                    .find(|r| r.0 <= s && s <= r.1)
                    .and_then(|r| servers.iter().position(|a| *a == r.2))
                    .unwrap_or(0)
            }
        }
    }

    /// The commands that publish and subscribe here.
    pub fn verbs(&self) -> (&'static str, &'static str, &'static str) {
        match self {
            Topology::Single(_) => ("PUBLISH", "SUBSCRIBE", "UNSUBSCRIBE"),
            Topology::Cluster(_) => ("SPUBLISH", "SSUBSCRIBE", "SUNSUBSCRIBE"),
        }
    }
}

/// Asks a cluster node for the slot map (`CLUSTER SLOTS`).
pub fn discover(seed: &str, sharded: bool) -> redis::RedisResult<Topology> {
    if !sharded {
        return Ok(Topology::Single(seed.to_string()));
    }
    let client = redis::Client::open(seed)?;
    let mut con = client.get_connection_with_timeout(std::time::Duration::from_secs(2))?;
    let v: Value = redis::cmd("CLUSTER").arg("SLOTS").query(&mut con)?;
    // The masters take the seed's credentials (`redis://user:pass@host:port`).
    let auth = seed
        .strip_prefix("redis://")
        .and_then(|r| r.split('/').next())
        .and_then(|r| r.rsplit_once('@'))
        .map_or(String::new(), |(a, _)| format!("{a}@"));
    let mut ranges = Vec::new();
    if let Value::Array(entries) = v {
        for e in entries {
            let Value::Array(fields) = e else { continue };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                continue;
            };
            let host = match master.first() {
                Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                _ => continue,
            };
            let Some(Value::Int(port)) = master.get(1) else {
                continue;
            };
            ranges.push((
                *start as u16,
                *end as u16,
                format!("redis://{auth}{host}:{port}"),
            ));
        }
    }
    if ranges.is_empty() {
        return Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "CLUSTER SLOTS returned no slots (is this a Redis Cluster? without --redis-sharded use plain pub/sub)",
        )));
    }
    Ok(Topology::Cluster(ranges))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from Redis' CLUSTER KEYSLOT.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_eq!(crc16(b"123456789"), 0x31c3);
        let t = Topology::Cluster(vec![
            (0, 8191, "redis://a:1".into()),
            (8192, 16383, "redis://b:2".into()),
        ]);
        assert_eq!(t.servers().len(), 2);
        assert_eq!(t.owner("foo"), 1);
        assert_eq!(t.owner("bar"), 0);
    }
}
