//! How the controller reaches an instance: run a command with bytes on stdin, or stream a
//! command's output line by line. Shipping the commit, starting the agent and following its
//! events are built on these two calls, so SSH and SSM differ only here.
//!
//! Guarantees: no secret is ever put on a command line (secrets travel on stdin); every
//! connect is bounded. Caveat: a stream that ends without the agent's result means the
//! connection dropped, and the caller resumes from the last `seq` it saw.

pub mod chunks;
pub mod fetch;
pub mod keys;
pub mod ssh;
pub mod ssm;

use std::net::IpAddr;
use std::pin::Pin;

use futures::future::BoxFuture;
use futures::Stream;

/// Lines of a remote command's stdout, without their newlines.
pub type Lines = Pin<Box<dyn Stream<Item = std::io::Result<String>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("failed to connect to {host} within {:.1}s: {last}", waited.as_secs_f64())]
    Connect {
        host: String,
        waited: std::time::Duration,
        last: String,
    },
    #[error("the connection to {host} failed: {message}")]
    Io { host: String, message: String },
    #[error("`{command}` failed on {host} ({status}): {stderr}")]
    Command {
        host: String,
        command: String,
        status: String,
        stderr: String,
    },
    #[error("refusing to connect to {address}: it is outside the allowed networks ({allowed})")]
    NotAllowed { address: String, allowed: String },
    /// The host presented another key than the one pinned for this launch: an attack or a
    /// misconfiguration, never something to retry on another instance.
    #[error("the host key of {host} does not match the one pinned for this launch: {message}")]
    HostKeyMismatch { host: String, message: String },
    #[error(transparent)]
    Keys(#[from] keys::KeyError),
}

/// One connection to one instance.
pub trait Transport: Send + Sync {
    /// Runs `argv` with `stdin`, returning its stdout; a non-zero exit is an error that
    /// carries stderr.
    fn exec<'a>(&'a self, argv: &'a [String], stdin: Vec<u8>) -> BoxFuture<'a, Result<Vec<u8>, TransportError>>;

    /// Runs `argv` and yields its stdout line by line until it exits or the connection drops.
    fn stream<'a>(&'a self, argv: &'a [String]) -> BoxFuture<'a, Result<Lines, TransportError>>;

    /// Drops the current connection, if any, and connects again (bounded).
    fn reconnect(&self) -> BoxFuture<'_, Result<(), TransportError>>;

    /// Closes the connection.
    fn close(&self) -> BoxFuture<'_, ()>;
}

/// An IPv4 or IPv6 network, `ADDR/LEN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

/// Why a string is not a [`Cidr`].
#[derive(Debug, thiserror::Error)]
pub enum CidrError {
    #[error("`{0}` is not ADDR/LEN")]
    NoLength(String),
    #[error("`{addr}` is not an IP address")]
    Address {
        addr: String,
        #[source]
        source: std::net::AddrParseError,
    },
    #[error("`{len}` is not a prefix length")]
    Length {
        len: String,
        #[source]
        source: std::num::ParseIntError,
    },
    #[error("prefix length {len} is over {max}")]
    TooLong { len: u8, max: u8 },
}

impl std::str::FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let (a, l) = s.split_once('/').ok_or_else(|| CidrError::NoLength(s.to_string()))?;
        let addr: IpAddr = a.parse().map_err(|source| CidrError::Address {
            addr: a.to_string(),
            source,
        })?;
        let len: u8 = l.parse().map_err(|source| CidrError::Length {
            len: l.to_string(),
            source,
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(CidrError::TooLong { len, max });
        }
        Ok(Cidr { addr, len })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> u128 {
            match ip {
                IpAddr::V4(v) => u32::from(v) as u128,
                IpAddr::V6(v) => u128::from(v),
            }
        };
        if self.addr.is_ipv4() != ip.is_ipv4() {
            return false;
        }
        let width = if ip.is_ipv4() { 32 } else { 128 };
        let shift = width - self.len as u32;
        if shift >= 128 {
            return true;
        }
        bits(ip) >> shift == bits(self.addr) >> shift
    }
}

/// Checks `address` against `allowed` (empty: anything). The local farm sets its bridged
/// subnet here, so that no address the emulator invents is ever a target.
pub fn check_allowed(address: &str, allowed: &[Cidr]) -> Result<IpAddr, TransportError> {
    let not_allowed = || TransportError::NotAllowed {
        address: address.to_string(),
        allowed: allowed.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", "),
    };
    let ip: IpAddr = address.parse().map_err(|_| not_allowed())?;
    if allowed.is_empty() || allowed.iter().any(|c| c.contains(ip)) {
        Ok(ip)
    } else {
        Err(not_allowed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_addresses_in_the_allowed_networks_pass() {
        let farm: Vec<Cidr> = vec!["10.251.37.0/24".parse().unwrap()];
        assert!(check_allowed("10.251.37.4", &farm).is_ok());
        assert!(check_allowed("10.251.38.4", &farm).is_err());
        assert!(check_allowed("54.12.1.9", &farm).is_err());
        assert!(check_allowed("not-an-ip", &farm).is_err());
        assert!(check_allowed("54.12.1.9", &[]).is_ok(), "no list: anything");
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
    }
}

/// Quotes one word for a POSIX shell; plain words stay as they are, for readable scripts.
pub fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}
