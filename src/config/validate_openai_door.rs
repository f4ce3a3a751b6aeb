//! `[openai]`: where the OpenAI-compatible front door listens. It speaks
//! plain HTTP/1.1 (no TLS of its own), so the API keys its callers send
//! cross the wire in the clear: an address that is not loopback is refused
//! unless `allow_plaintext_on_network` says a TLS proxy in front (or a
//! private network) makes that fine.

use std::net::SocketAddr;

use super::ctx::Ctx;
use super::raw::RawOpenAiDoor;
use super::{ConfigError, OpenAiDoorConfig};

pub(super) fn validate_openai_door(c: &Ctx<'_>, raw: RawOpenAiDoor) -> Result<OpenAiDoorConfig, ConfigError> {
    let listen: Option<SocketAddr> = match raw.listen {
        None => None,
        Some(a) if a.is_empty() => None,
        Some(a) => Some(a.parse().map_err(|_| {
            c.err(
                "openai.listen",
                format!(
                    "{} is not an address like \"127.0.0.1:8080\"",
                    crate::excerpt::excerpt(&a)
                ),
            )
        })?),
    };
    if let Some(addr) = listen
        && !addr.ip().is_loopback()
        && !raw.allow_plaintext_on_network.unwrap_or(false)
    {
        return Err(c.err(
            "openai.listen",
            format!(
                "{addr} is not a loopback address and the OpenAI front door speaks plain HTTP \
                 (API keys would cross the network in the clear): put a TLS proxy in front and \
                 set openai.allow_plaintext_on_network = true, or listen on 127.0.0.1"
            ),
        ));
    }
    Ok(OpenAiDoorConfig { listen })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn check(listen: &str, allow: Option<bool>) -> Result<OpenAiDoorConfig, ConfigError> {
        let c = Ctx {
            file: Path::new("dispatcher.toml"),
        };
        validate_openai_door(
            &c,
            RawOpenAiDoor {
                listen: Some(listen.into()),
                allow_plaintext_on_network: allow,
            },
        )
    }

    #[test]
    fn loopback_is_served_and_the_network_only_when_allowed() {
        assert_eq!(
            check("127.0.0.1:8080", None).unwrap().listen,
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(check("", None).unwrap().listen, None);
        let e = check("0.0.0.0:8080", None).unwrap_err();
        assert_eq!(e.key, "openai.listen");
        assert!(e.problem.contains("allow_plaintext_on_network"), "{e}");
        assert!(check("0.0.0.0:8080", Some(true)).is_ok());
        let e = check("localhost:80", None).unwrap_err();
        assert!(e.problem.contains("not an address"), "{e}");
    }
}
