//! The webhook target policy: which addresses a webhook may reach. The
//! control plane applies it when a trigger is created or updated, and every
//! node applies it again when it connects (see `data-plane/src/delivery/`),
//! with the same flags on both.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;

/// The flag (and the variable beside it) of the ranges that are refused.
pub const DENY_FLAG: &str = "--webhook-deny-cidrs";
/// The flag of the ranges that are allowed even inside a denied one.
pub const ALLOW_FLAG: &str = "--webhook-allow-cidrs";
/// Link-local addresses, which hold the cloud metadata services (AWS, GCP
/// and Azure at 169.254.169.254, AWS's IPv6 endpoint at fd00:ec2::254).
pub const DEFAULT_DENY_CIDRS: &str = "169.254.0.0/16,fd00:ec2::254/128";
/// How long validation waits for a webhook host's DNS answers; a name that
/// does not answer in time is left to the nodes' connect-time check.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// A refused address, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub addr: IpAddr,
    /// The denied range it lies in; `None` for the unspecified address.
    pub denied_by: Option<IpNet>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.denied_by {
            Some(net) => write!(
                f,
                "{} is refused by the webhook target policy ({DENY_FLAG} has {net}; {ALLOW_FLAG} can allow it)",
                self.addr
            ),
            // 0.0.0.0 and :: connect to the local host on Linux.
            None => write!(f, "{} is refused by the webhook target policy (the unspecified address reaches the local host and cannot be allowed)", self.addr),
        }
    }
}

/// Refuses an address that lies in a denied range and in no allowed one,
/// and always the unspecified addresses. IPv4-mapped IPv6 addresses
/// (`::ffff:169.254.169.254`) are matched as the IPv4 address they reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookPolicy {
    deny: Vec<IpNet>,
    allow: Vec<IpNet>,
}

impl Default for WebhookPolicy {
    fn default() -> Self {
        Self::new(DEFAULT_DENY_CIDRS.parse::<Cidrs>().expect("default deny list parses").0, Vec::new())
    }
}

impl WebhookPolicy {
    pub fn new(deny: Vec<IpNet>, allow: Vec<IpNet>) -> Self {
        let normal = |nets: Vec<IpNet>| nets.into_iter().map(normalize_net).collect();
        Self { deny: normal(deny), allow: normal(allow) }
    }

    /// Both lists as the flags take them (comma-separated CIDRs).
    pub fn parse(deny: &str, allow: &str) -> Result<Self, CidrError> {
        Ok(Self::new(deny.parse::<Cidrs>()?.0, allow.parse::<Cidrs>()?.0))
    }

    pub fn check(&self, addr: IpAddr) -> Result<(), Refusal> {
        let addr = normalize(addr);
        if addr.is_unspecified() {
            return Err(Refusal { addr, denied_by: None });
        }
        match self.deny.iter().find(|net| net.contains(&addr)) {
            Some(net) if !self.allow.iter().any(|a| a.contains(&addr)) => Err(Refusal { addr, denied_by: Some(*net) }),
            _ => Ok(()),
        }
    }

    /// The refusal of the webhook URL's host when it is an IP literal; a
    /// URL that does not parse or names a host is not this check's business.
    pub fn check_url_literal(&self, url: &url::Url) -> Result<(), Refusal> {
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.check(ip.into()),
            Some(url::Host::Ipv6(ip)) => self.check(ip.into()),
            _ => Ok(()),
        }
    }

    /// Resolves the host name of `url` (at most `timeout`) and describes its
    /// first refused answer. A URL that does not parse, an IP literal, a name
    /// that does not resolve, or one that takes too long is `None`: the
    /// nodes check again at connect time.
    pub async fn refused_dns_answer(&self, url: &str, timeout: Duration) -> Option<String> {
        let url = url::Url::parse(url.trim()).ok()?;
        let Some(url::Host::Domain(host)) = url.host() else { return None };
        let answers = tokio::time::timeout(timeout, tokio::net::lookup_host((host, 0))).await.ok()?.ok()?;
        let refusal = answers.into_iter().find_map(|a| self.check(a.ip()).err())?;
        Some(format!("`{host}` resolves to {refusal}"))
    }
}

/// `::ffff:a.b.c.d` is the IPv4 address `a.b.c.d` on a dual-stack socket.
fn normalize(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// A range inside `::ffff:0:0/96` as the IPv4 range it maps, so that it
/// matches the normalized addresses.
fn normalize_net(net: IpNet) -> IpNet {
    match (net, normalize(net.addr())) {
        (IpNet::V6(v6), IpAddr::V4(v4)) if v6.prefix_len() >= 96 => {
            IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).expect("prefix of at most 32")
        }
        _ => net,
    }
}

/// A bad entry of a CIDR list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{given}` is not a CIDR such as 10.0.0.0/8 or fd00::/8: {why}")]
pub struct CidrError {
    pub given: String,
    pub why: String,
}

/// A comma-separated CIDR list as the flags take it; an empty value is an
/// empty list. A bare address is a range of one address.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cidrs(pub Vec<IpNet>);

impl FromStr for Cidrs {
    type Err = CidrError;

    fn from_str(list: &str) -> Result<Self, CidrError> {
        list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(parse_cidr).collect::<Result<_, _>>().map(Cidrs)
    }
}

fn parse_cidr(s: &str) -> Result<IpNet, CidrError> {
    let bad = |why: String| CidrError { given: s.to_owned(), why };
    let net = match s.split_once('/') {
        None => s.parse::<IpAddr>().map(IpNet::from).map_err(|_| bad("not an IP address".into()))?,
        Some((addr, len)) => {
            let addr = addr.parse::<IpAddr>().map_err(|_| bad(format!("`{addr}` is not an IP address")))?;
            let len = len.parse::<u8>().map_err(|_| bad(format!("prefix length `{len}` is not a number")))?;
            IpNet::new(addr, len).map_err(|_| bad(format!("prefix length {len} is too long for {addr}")))?
        }
    };
    if net.trunc() != net {
        // 10.0.0.1/8 is most likely a typo; say which range it would be.
        return Err(bad(format!("host bits are set; the range is {}", net.trunc())));
    }
    Ok(net)
}

/// The two flags, the same on both planes (flatten them into the plane's
/// arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookPolicyArgs {
    /// Webhook targets in these ranges are refused (comma-separated CIDRs;
    /// an empty value denies nothing), at trigger validation and when a node
    /// connects. The default is link-local, where cloud metadata lives.
    /// 0.0.0.0 and :: are always refused.
    #[arg(long, env = "KT_WEBHOOK_DENY_CIDRS", default_value = DEFAULT_DENY_CIDRS)]
    pub webhook_deny_cidrs: Cidrs,

    /// Ranges allowed even inside a denied one (comma-separated CIDRs).
    #[arg(long, env = "KT_WEBHOOK_ALLOW_CIDRS", default_value = "")]
    pub webhook_allow_cidrs: Cidrs,
}

impl WebhookPolicyArgs {
    pub fn policy(&self) -> WebhookPolicy {
        WebhookPolicy::new(self.webhook_deny_cidrs.0.clone(), self.webhook_allow_cidrs.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn test_cidr_lists_parse_and_bad_entries_say_why() {
        let nets = "10.0.0.0/8, fd00::/8,,192.0.2.7".parse::<Cidrs>().unwrap().0;
        let shown: Vec<String> = nets.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["10.0.0.0/8", "fd00::/8", "192.0.2.7/32"]);
        assert_eq!("".parse::<Cidrs>().unwrap(), Cidrs::default());
        assert_eq!(" , ".parse::<Cidrs>().unwrap(), Cidrs::default());

        for (given, why) in [
            ("10.0.0.0/33", "prefix length 33 is too long for 10.0.0.0"),
            ("10.0.0.0/x", "prefix length `x` is not a number"),
            ("10.0.0/8", "`10.0.0` is not an IP address"),
            ("localhost", "not an IP address"),
            ("10.0.0.1/8", "host bits are set; the range is 10.0.0.0/8"),
        ] {
            let err = format!("10.0.0.0/8,{given}").parse::<Cidrs>().unwrap_err();
            assert_eq!(err, CidrError { given: given.into(), why: why.into() });
            assert!(err.to_string().starts_with(&format!("`{given}` is not a CIDR")), "{err}");
        }
    }

    #[test]
    fn test_default_policy_refuses_metadata_and_link_local_only() {
        let p = WebhookPolicy::default();
        for refused in ["169.254.169.254", "169.254.0.1", "::ffff:169.254.169.254", "fd00:ec2::254"] {
            let err = p.check(ip(refused)).unwrap_err();
            assert!(err.denied_by.is_some(), "{refused}");
        }
        let mapped = p.check(ip("::ffff:169.254.169.254")).unwrap_err();
        assert_eq!(mapped.addr, ip("169.254.169.254"));
        assert_eq!(
            mapped.to_string(),
            "169.254.169.254 is refused by the webhook target policy \
             (--webhook-deny-cidrs has 169.254.0.0/16; --webhook-allow-cidrs can allow it)"
        );
        for allowed in ["127.0.0.1", "10.1.2.3", "::1", "fd00:ec2::253", "93.184.215.14", "169.255.0.1"] {
            assert_eq!(p.check(ip(allowed)), Ok(()), "{allowed}");
        }
    }

    #[test]
    fn test_unspecified_is_always_refused() {
        let p = WebhookPolicy::parse("", "0.0.0.0/0,::/0").unwrap();
        for addr in ["0.0.0.0", "::", "::ffff:0.0.0.0"] {
            let err = p.check(ip(addr)).unwrap_err();
            assert_eq!(err.denied_by, None, "{addr}");
            assert!(err.to_string().contains("cannot be allowed"), "{err}");
        }
        assert_eq!(p.check(ip("169.254.169.254")), Ok(()));
    }

    #[test]
    fn test_allow_overrides_deny() {
        let p = WebhookPolicy::parse("10.0.0.0/8,127.0.0.0/8,::1/128", "10.1.0.0/16,::ffff:127.0.0.2/128").unwrap();
        assert!(p.check(ip("10.2.0.1")).is_err());
        assert_eq!(p.check(ip("10.1.200.1")), Ok(()));
        assert!(p.check(ip("127.0.0.1")).is_err());
        // An allowed range written IPv4-mapped matches the IPv4 address.
        assert_eq!(p.check(ip("127.0.0.2")), Ok(()));
        assert_eq!(p.check(ip("::ffff:127.0.0.2")), Ok(()));
        assert!(p.check(ip("::1")).is_err());
        assert_eq!(p.check(ip("192.168.1.1")), Ok(()));
        // A denied range written IPv4-mapped denies the IPv4 addresses too.
        let mapped = WebhookPolicy::parse("::ffff:192.168.0.0/112", "").unwrap();
        assert!(mapped.check(ip("192.168.3.4")).is_err());
    }

    #[test]
    fn test_url_literals_are_checked_names_are_not() {
        let p = WebhookPolicy::default();
        let url = |s: &str| url::Url::parse(s).unwrap();
        assert!(p.check_url_literal(&url("http://169.254.169.254/latest")).is_err());
        assert!(p.check_url_literal(&url("http://[::ffff:169.254.169.254]/")).is_err());
        assert!(p.check_url_literal(&url("https://[fd00:ec2::254]:8443/x")).is_err());
        // WHATWG URL parsing turns other spellings of an IPv4 address into it.
        assert!(p.check_url_literal(&url("http://0xa9fea9fe/")).is_err());
        assert!(p.check_url_literal(&url("http://0/")).is_err());
        assert_eq!(p.check_url_literal(&url("http://metadata.example/")), Ok(()));
        assert_eq!(p.check_url_literal(&url("http://127.0.0.1:8080/")), Ok(()));
    }

    #[tokio::test]
    async fn test_dns_answers_are_checked() {
        let p = WebhookPolicy::parse("127.0.0.0/8,::1/128", "").unwrap();
        let why = p.refused_dns_answer("http://localhost:1234/hook", LOOKUP_TIMEOUT).await.unwrap();
        assert!(why.starts_with("`localhost` resolves to "), "{why}");
        assert!(why.contains("is refused by the webhook target policy"), "{why}");
        assert_eq!(WebhookPolicy::default().refused_dns_answer("http://localhost/", LOOKUP_TIMEOUT).await, None);
        // Literals are the synchronous check's; a name that does not resolve is the nodes'.
        assert_eq!(p.refused_dns_answer("http://127.0.0.1/", LOOKUP_TIMEOUT).await, None);
        assert_eq!(p.refused_dns_answer("http://does-not-exist.invalid/", LOOKUP_TIMEOUT).await, None);
        assert_eq!(p.refused_dns_answer("not a url", LOOKUP_TIMEOUT).await, None);
    }
}
