//! Where Concord may send a call it makes for a caller (saga steps and compensations, 2PC
//! participants): the outbound policy.
//!
//! By default only public addresses: no loopback, private, link-local (cloud metadata),
//! unique-local, shared, multicast or reserved address, judged on the address the call connects
//! to (the adapter checks every address a name resolves to, so a name that resolves to
//! 127.0.0.1 is refused like the literal). A non-empty allow-list (`saga_allowed_hosts`,
//! `tx_allowed_hosts`) replaces that default: only what it names may be called, and what it names
//! is called whatever address it is on. An entry is a host (`orders`), a host and port
//! (`orders:8080`, `[::1]:9000`) or a network (`10.0.0.0/8`, `fd00::/8`): a network admits any
//! host whose addresses all lie in it.

use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use url::{Host, Url};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// A host as the URL parser writes it (lower-case name, `1.2.3.4`, `[::1]`), any port or one.
    Host {
        host: String,
        port: Option<u16>,
    },
    Net(IpNet),
}

/// The allow-list of one kind of call, parsed once at configuration load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundPolicy {
    /// The setting that holds the list, named in refusals so an operator knows what to change.
    setting: &'static str,
    entries: Vec<Entry>,
}

/// A call the policy does not allow, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// A URL the policy allows, as the URL parser read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// As the URL parser writes it: lower-case name, `1.2.3.4` or `[::1]`.
    pub host: String,
    pub port: u16,
    /// The path, percent-encoded, starting with `/`.
    pub path: String,
}

impl OutboundPolicy {
    /// Public addresses only.
    #[must_use]
    pub fn public_only(setting: &'static str) -> Self {
        Self {
            setting,
            entries: Vec::new(),
        }
    }

    /// From a setting's entries.
    ///
    /// # Errors
    /// An entry that is neither a host, a host:port nor a network.
    pub fn new(setting: &'static str, entries: &[String]) -> Result<Self, String> {
        let entries = entries
            .iter()
            .map(|e| parse_entry(e).map_err(|why| format!("{setting}: entry {e:?}: {why}")))
            .collect::<Result<_, _>>()?;
        Ok(Self { setting, entries })
    }

    /// Whether an address-independent host entry names `host` (any port): such a host is called
    /// whatever it resolves to.
    fn names_host(&self, host: &str) -> bool {
        self.entries
            .iter()
            .any(|e| matches!(e, Entry::Host { host: h, .. } if h == host))
    }

    fn names(&self, host: &str, port: u16) -> bool {
        self.entries
            .iter()
            .any(|e| matches!(e, Entry::Host { host: h, port: p } if h == host && p.is_none_or(|p| p == port)))
    }

    fn in_net(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.entries
            .iter()
            .any(|e| matches!(e, Entry::Net(n) if n.contains(&ip)))
    }

    fn has_nets(&self) -> bool {
        self.entries.iter().any(|e| matches!(e, Entry::Net(_)))
    }

    /// Checks a URL before any connection: scheme, user info, and the host and port against the
    /// list (a name not on it is checked again on its resolved addresses by
    /// [`Self::permits_resolved`]).
    ///
    /// # Errors
    /// What is wrong with it, naming the setting that would allow it.
    pub fn check(&self, url: &str) -> Result<Target, Refused> {
        let parsed = Url::parse(url).map_err(|e| Refused(format!("not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(Refused(format!("scheme {} is not http or https", parsed.scheme())));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(Refused("a URL with user info is refused".into()));
        }
        let (Some(host), Some(port)) = (parsed.host(), parsed.port_or_known_default()) else {
            return Err(Refused("the URL has no host".into()));
        };
        let target = Target {
            host: host.to_string(),
            port,
            path: parsed.path().to_owned(),
        };
        if self.names(target.host.trim_end_matches('.'), port) {
            return Ok(target);
        }
        let not_listed = || {
            Refused(format!(
                "{}:{port} is not in {} (a host, host:port or network)",
                target.host, self.setting
            ))
        };
        let ip = match host {
            Host::Ipv4(a) => IpAddr::V4(a),
            Host::Ipv6(a) => IpAddr::V6(a),
            Host::Domain(d) => {
                let d = d.trim_end_matches('.');
                // A host listed with other ports is not open on this one, whatever it resolves
                // to (the resolver, which sees no port, lets a listed host through).
                if !self.entries.is_empty() && (!self.has_nets() || self.names_host(d)) {
                    return Err(not_listed());
                }
                if self.entries.is_empty() && (d == "localhost" || d.ends_with(".localhost")) {
                    return Err(Refused(format!(
                        "{d} is a loopback name; name it in {} to call it",
                        self.setting
                    )));
                }
                // Judged again on each address it resolves to.
                return Ok(target);
            }
        };
        if self.in_net(ip) {
            return Ok(target);
        }
        if !self.entries.is_empty() {
            return Err(not_listed());
        }
        match forbidden(ip) {
            Some(class) => Err(Refused(format!(
                "{ip} is a {class} address; name it in {} to call it",
                self.setting
            ))),
            None => Ok(target),
        }
    }

    /// Whether a call to the name `host` (one [`Self::check`] let through) may connect to `ip`,
    /// one of the addresses it resolved to.
    ///
    /// # Errors
    /// Why not, naming the setting that would allow it.
    pub fn permits_resolved(&self, host: &str, ip: IpAddr) -> Result<(), Refused> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if self.names_host(&host) || self.in_net(ip) {
            return Ok(());
        }
        if !self.entries.is_empty() {
            return Err(Refused(format!(
                "{host} resolves to {ip}, in no network of {}",
                self.setting
            )));
        }
        match forbidden(ip) {
            Some(class) => Err(Refused(format!(
                "{host} resolves to {ip}, a {class} address; name the host in {} to call it",
                self.setting
            ))),
            None => Ok(()),
        }
    }
}

impl OutboundPolicy {
    /// Whether the list names `url`'s host and port, or holds the address the URL is written
    /// with: what a credential bound to this list may be sent to. An empty list names nothing.
    #[must_use]
    pub fn binds(&self, url: &str) -> bool {
        let Ok(parsed) = Url::parse(url) else { return false };
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return false;
        }
        let (Some(host), Some(port)) = (parsed.host(), parsed.port_or_known_default()) else {
            return false;
        };
        let ip = match host {
            Host::Ipv4(a) => Some(IpAddr::V4(a)),
            Host::Ipv6(a) => Some(IpAddr::V6(a)),
            Host::Domain(_) => None,
        };
        self.names(&host.to_string(), port) || ip.is_some_and(|ip| self.in_net(ip))
    }
}

fn parse_entry(entry: &str) -> Result<Entry, String> {
    let entry = entry.trim();
    if entry.contains('/') {
        return entry
            .parse::<IpNet>()
            .map(|n| Entry::Net(n.trunc()))
            .map_err(|_| "not a network (like 10.0.0.0/8 or fd00::/8)".into());
    }
    let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
        let (inner, after) = rest.split_once(']').ok_or("an unclosed [")?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("text after ]")?),
        };
        (format!("[{inner}]"), port)
    } else if entry.matches(':').count() > 1 {
        (format!("[{entry}]"), None)
    } else {
        match entry.split_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (entry.to_owned(), None),
        }
    };
    let port = port
        .map(|p| {
            p.parse::<u16>()
                .map_err(|_| format!("port {p:?} is not a number up to 65535"))
        })
        .transpose()?;
    let host = Host::parse(&host).map_err(|e| format!("not a host: {e}"))?;
    Ok(Entry::Host {
        host: host.to_string(),
        port,
    })
}

/// An IPv4 address carried in an IPv6 one (mapped `::ffff:a.b.c.d`) is judged as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    }
}

/// The class of a non-public address, or none for a public one.
#[must_use]
pub fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(a) => forbidden_v4(a),
        IpAddr::V6(a) => forbidden_v6(a),
    }
}

fn forbidden_v4(a: Ipv4Addr) -> Option<&'static str> {
    let [o0, o1, o2, _] = a.octets();
    Some(match (o0, o1, o2) {
        (0, ..) => "this-network",
        (127, ..) => "loopback",
        (10, ..) | (172, 16..=31, _) | (192, 168, _) => "private",
        (169, 254, _) => "link-local (cloud metadata)",
        (100, 64..=127, _) => "shared (carrier NAT, cloud metadata)",
        (192, 0, 0) => "protocol-assignment",
        (192, 88, 99) => "6to4-relay",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (198, 18..=19, _) => "benchmarking",
        (224..=239, ..) => "multicast",
        (240..=255, ..) => "reserved",
        _ => return None,
    })
}

fn forbidden_v6(a: Ipv6Addr) -> Option<&'static str> {
    let s = a.segments();
    if a.is_loopback() {
        return Some("loopback");
    }
    if a.is_unspecified() {
        return Some("unspecified");
    }
    // NAT64 (64:ff9b::/96), IPv4-compatible (::/96) and IPv4-translated (::ffff:0:0:0/96)
    // addresses reach the IPv4 inside them.
    if (s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4])
        || s[0..6] == [0; 6]
        || (s[0..4] == [0; 4] && s[4] == 0xffff && s[5] == 0)
    {
        let [a0, a1] = s[6].to_be_bytes();
        let [a2, a3] = s[7].to_be_bytes();
        return forbidden_v4(Ipv4Addr::new(a0, a1, a2, a3)).or(Some("IPv4-embedding"));
    }
    // 6to4 (2002::/16) carries an IPv4 address in its next 32 bits.
    if s[0] == 0x2002 {
        let [a0, a1] = s[1].to_be_bytes();
        let [a2, a3] = s[2].to_be_bytes();
        return forbidden_v4(Ipv4Addr::new(a0, a1, a2, a3));
    }
    Some(match s[0] {
        x if x & 0xfe00 == 0xfc00 => "unique-local (cloud metadata)",
        x if x & 0xffc0 == 0xfe80 => "link-local",
        x if x & 0xffc0 == 0xfec0 => "site-local",
        x if x & 0xff00 == 0xff00 => "multicast",
        0x2001 if s[1] == 0x0db8 => "documentation",
        // Teredo tunnels (2001::/32) carry an IPv4 server and client inside.
        0x2001 if s[1] == 0 => "Teredo",
        // Local-use NAT64 (64:ff9b:1::/48).
        0x0064 if s[1] == 0xff9b && s[2] == 1 => "local NAT64",
        0x0100 if s[1..4] == [0; 3] => "discard",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(entries: &[&str]) -> OutboundPolicy {
        OutboundPolicy::new(
            "x_allowed_hosts",
            &entries.iter().map(|e| (*e).to_owned()).collect::<Vec<_>>(),
        )
        .unwrap()
    }

    #[test]
    fn by_default_only_public_addresses() {
        let p = policy(&[]);
        for url in [
            "http://127.0.0.1/",
            "http://127.1.2.3:8080/x",
            "http://localhost:80/",
            "http://api.localhost/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[fd00:ec2::254]/",
            "http://100.100.100.200/",
            "http://10.1.2.3/",
            "http://172.16.0.1/",
            "http://192.168.1.1/",
            "http://0.0.0.0/",
            "http://[::]/",
            "http://[fe80::1]/",
            "http://[64:ff9b::7f00:1]/",
            "http://[2002:7f00:1::]/",
            "http://224.0.0.1/",
            "http://255.255.255.255/",
            // Spellings the URL parser reads as 127.0.0.1.
            "http://2130706433/",
            "http://0x7f.1/",
            "http://127.000.000.001/",
            "http://localhost./",
            "http://[::ffff:0:7f00:1]/",
            "http://[64:ff9b:1::a00:1]/",
            "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
            "http://192.88.99.1/",
        ] {
            let e = p.check(url).expect_err(url);
            assert!(e.0.contains("x_allowed_hosts"), "{url}: {e}");
        }
        for url in [
            "http://93.184.215.14/",
            "https://[2606:4700::1111]/",
            "https://payments.example.com/x",
        ] {
            assert!(p.check(url).is_ok(), "{url}");
        }
        assert!(
            p.permits_resolved("evil.example", "127.0.0.1".parse().unwrap())
                .is_err()
        );
        assert!(
            p.permits_resolved("evil.example", "169.254.169.254".parse().unwrap())
                .is_err()
        );
        assert!(
            p.permits_resolved("evil.example", "::ffff:10.0.0.1".parse().unwrap())
                .is_err()
        );
        assert!(
            p.permits_resolved("example.com", "93.184.215.14".parse().unwrap())
                .is_ok()
        );
    }

    #[test]
    fn user_info_and_other_schemes_are_refused() {
        let p = policy(&["127.0.0.1"]);
        assert!(p.check("http://u:p@127.0.0.1/").is_err());
        assert!(p.check("http://u@127.0.0.1/").is_err());
        assert!(p.check("ftp://127.0.0.1/").is_err());
        assert!(p.check("file:///etc/passwd").is_err());
        assert!(p.check("not a url").is_err());
    }

    #[test]
    fn a_listed_host_is_called_wherever_it_is_and_nothing_else_is() {
        let p = policy(&["127.0.0.1:8080", "orders", "[::1]"]);
        let t = p.check("http://127.0.0.1:8080/a/b?c").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.path.as_str()), ("127.0.0.1", 8080, "/a/b"));
        assert!(p.check("http://127.0.0.1:8081/").is_err(), "port compared exactly");
        assert!(p.check("http://127.0.0.1/").is_err());
        assert!(
            p.check("http://ORDERS:9000/").is_ok(),
            "a host entry without port: any port"
        );
        assert!(p.check("http://[::1]:7/").is_ok());
        assert!(
            p.check("https://payments.example.com/").is_err(),
            "a list is exhaustive"
        );
        assert!(p.check("http://orders.evil/").is_err());
        assert!(p.permits_resolved("orders", "10.0.0.7".parse().unwrap()).is_ok());
        assert!(p.permits_resolved("orders.", "127.0.0.1".parse().unwrap()).is_ok());
        assert!(p.permits_resolved("other", "93.184.215.14".parse().unwrap()).is_err());
    }

    #[test]
    fn a_host_listed_with_a_port_is_not_open_on_others_beside_a_network() {
        let p = policy(&["payments:8443", "10.0.0.0/8"]);
        assert!(p.check("https://payments:8443/").is_ok());
        assert!(
            p.check("http://payments:6379/").is_err(),
            "another port of a listed host"
        );
        assert!(p.check("http://payments.:6379/").is_err());
        assert!(
            p.check("http://orders.svc/").is_ok(),
            "other names are judged on their addresses"
        );
    }

    #[test]
    fn a_network_admits_hosts_whose_addresses_lie_in_it() {
        let p = policy(&["10.0.0.0/8", "fd00::/8"]);
        assert!(p.check("http://10.2.3.4:8080/").is_ok());
        assert!(p.check("http://[fd12::1]/").is_ok());
        assert!(p.check("http://[::ffff:10.0.0.1]/").is_ok());
        assert!(p.check("http://127.0.0.1/").is_err());
        assert!(p.check("http://169.254.169.254/").is_err());
        // A name passes the first check and is judged by where it resolves.
        assert!(p.check("http://orders.svc.cluster.local/").is_ok());
        assert!(
            p.permits_resolved("orders.svc.cluster.local", "10.96.0.12".parse().unwrap())
                .is_ok()
        );
        assert!(
            p.permits_resolved("orders.svc.cluster.local", "127.0.0.1".parse().unwrap())
                .is_err()
        );
        assert!(
            p.permits_resolved("orders.svc.cluster.local", "93.184.215.14".parse().unwrap())
                .is_err()
        );
    }

    #[test]
    fn a_binding_names_hosts_and_ports_exactly() {
        let b = policy(&["payments:8443", "ledger", "10.1.0.0/16"]);
        assert!(b.binds("https://payments:8443/tx"));
        assert!(!b.binds("https://payments/tx"), "another port");
        assert!(!b.binds("https://payments.evil:8443/tx"));
        assert!(b.binds("http://LEDGER:1/x"));
        assert!(b.binds("http://10.1.2.3/"));
        assert!(!b.binds("http://10.2.0.1/"));
        assert!(!b.binds("http://u@ledger/"), "user info is never bound");
        assert!(!policy(&[]).binds("http://ledger/"));
    }

    #[test]
    fn bad_entries_stop_the_configuration() {
        for bad in ["10.0.0.0/33", "host:99999", "host:x", "[::1", "[::1]x", "a b"] {
            assert!(OutboundPolicy::new("s", &[bad.to_owned()]).is_err(), "{bad}");
        }
    }
}
