//! Disks, network adapters and the memory balloon in a VM's settings: the
//! `--disk`, `--net` and `--balloon` flag syntax, their TOML form
//! (`[[disk]]`, `[[net]]`, `[balloon]`) and their checks.
//!
//! A disk's serial is what the guest reads as its ID (virtio-blk GET_ID,
//! `/dev/disk/by-id`): the definition's, or `nestvm-disk<index>`, never
//! anything of the host's image path.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Most virtio devices (disks, adapters, the balloon) a VM can have: the
/// machine has one interrupt line for each (nestvm-arch's `VIRTIO_GSIS`,
/// which the VMM checks has this many).
pub const MAX_DEVICES: usize = 16;

/// Longest Linux interface name (`IFNAMSIZ` less the NUL).
pub const MAX_TAP_NAME: usize = 15;

/// Longest disk serial: the virtio-blk ID string (VIRTIO_BLK_ID_BYTES).
pub const MAX_SERIAL: usize = 20;

/// The serial of disk `index` (from 0, in the definition's order) when its
/// definition gives none: stable across restarts, saves and migrations, and
/// telling the guest nothing about the host.
pub fn default_serial(index: usize) -> String {
    format!("nestvm-disk{index}")
}

/// Why `serial` cannot be a disk's ID, if it cannot: 1 to [`MAX_SERIAL`]
/// bytes of printable ASCII.
fn serial_problem(serial: &str) -> Option<&'static str> {
    if serial.is_empty() {
        Some("it is empty")
    } else if serial.len() > MAX_SERIAL {
        Some("it is longer than 20 bytes")
    } else if !serial.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        Some("it is not printable ASCII")
    } else {
        None
    }
}

/// Checks a disk serial: 1 to [`MAX_SERIAL`] bytes of printable ASCII.
pub fn check_serial(serial: &str) -> Result<(), AdapterError> {
    match serial_problem(serial) {
        None => Ok(()),
        Some(problem) => Err(AdapterError::BadSerial {
            serial: serial.to_owned(),
            problem,
        }),
    }
}

/// Whether `name` can be a TAP: a Linux interface name of letters, digits,
/// '-', '_' and '.'.
pub fn valid_tap_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TAP_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Errors in disk and adapter settings.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// A `--disk` value that does not parse.
    #[error("invalid --disk '{0}': use path=FILE[,readonly=on][,serial=ID]")]
    BadDisk(String),
    /// A disk serial the guest could not be shown as its ID.
    #[error("invalid disk serial {serial:?}: {problem}; give 1 to {MAX_SERIAL} printable ASCII characters, or none for nestvm-disk<index>")]
    BadSerial {
        /// The serial given.
        serial: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// Two disks the guest would see with one ID.
    #[error("disk serial '{0}' is given to two disks: give each disk its own serial")]
    DuplicateSerial(String),
    /// A `--net` value that does not parse.
    #[error("invalid --net '{0}': use tap=NAME[,mac=52:56:00:00:00:01][,mac_spoofing=on|off] or user[,hostfwd=tcp:HOSTPORT-:GUESTPORT]...")]
    BadNet(String),
    /// A TAP name Linux would refuse.
    #[error("invalid TAP name '{0}': use 1 to 15 letters, digits, '-', '_' or '.'")]
    BadTap(String),
    /// A MAC that is not six hex octets, or is multicast.
    #[error("invalid MAC address '{0}': give six hex octets like 52:56:00:00:00:01, with an even first octet (unicast)")]
    BadMac(String),
    /// Too many devices.
    #[error("{0} disks and network adapters is too many: a VM can have at most {MAX_DEVICES}")]
    TooMany(usize),
    /// Two adapters on one TAP.
    #[error("TAP '{0}' is given twice: give each adapter its own TAP")]
    DuplicateTap(String),
    /// One image attached twice.
    #[error("disk image {0} is given twice")]
    DuplicateDisk(PathBuf),
    /// A `--balloon` value that does not parse.
    #[error("invalid --balloon '{0}': use on, or dynamic=on|off[,min=SIZE][,start=SIZE]")]
    BadBalloon(String),
}

/// The memory balloon: the VM's memory can then shrink (down to `min`) and
/// grow back while it runs, by hand (`vm resize`) or, with `dynamic`, to
/// follow the guest's demand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Follow the guest's demand (Hyper-V's dynamic memory).
    #[serde(default)]
    pub dynamic: bool,
    /// The least memory the VM may be left with, e.g. "256M".
    #[serde(default = "default_balloon_min")]
    pub min: String,
    /// The memory it starts with (Hyper-V's startup RAM); it can grow from
    /// there up to its `memory`. Absent: it starts with all of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
}

fn default_balloon_min() -> String {
    "256M".into()
}

impl BalloonConfig {
    /// `min` in bytes.
    pub fn min_bytes(&self) -> Result<u64, AdapterError> {
        crate::parse_size(&self.min).map_err(|_| AdapterError::BadBalloon(self.min.clone()))
    }

    /// `start` in bytes, if set.
    pub fn start_bytes(&self) -> Result<Option<u64>, AdapterError> {
        self.start
            .as_ref()
            .map(|s| crate::parse_size(s).map_err(|_| AdapterError::BadBalloon(s.clone())))
            .transpose()
    }
}

/// Parses `on` or `dynamic=on|off[,min=SIZE][,start=SIZE]`.
pub fn parse_balloon(s: &str) -> Result<BalloonConfig, AdapterError> {
    let bad = || AdapterError::BadBalloon(s.to_owned());
    let mut b = BalloonConfig {
        dynamic: false,
        min: default_balloon_min(),
        start: None,
    };
    for (i, part) in s.split(',').enumerate() {
        match part.split_once('=') {
            None if i == 0 && on_off(part) == Some(true) => {}
            Some(("dynamic", v)) => b.dynamic = on_off(v).ok_or_else(bad)?,
            Some(("min", v)) => {
                crate::parse_size(v).map_err(|_| bad())?;
                v.clone_into(&mut b.min);
            }
            Some(("start", v)) => {
                crate::parse_size(v).map_err(|_| bad())?;
                b.start = Some(v.to_owned());
            }
            _ => return Err(bad()),
        }
    }
    Ok(b)
}

/// A virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Raw image file.
    pub path: PathBuf,
    /// Attach read-only.
    #[serde(default)]
    pub readonly: bool,
    /// The ID the guest reads ([`MAX_SERIAL`] bytes of printable ASCII at
    /// most); [`default_serial`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

impl DiskConfig {
    /// The serial the guest sees for this disk, the VM's disk `index`.
    pub fn serial_or_default(&self, index: usize) -> String {
        self.serial.clone().unwrap_or_else(|| default_serial(index))
    }
}

/// A virtio-net adapter: on a TAP, or (`user`) on passt, which gives the
/// guest a network without root.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The TAP device's name (empty for a user-mode adapter).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tap: String,
    /// User-mode networking through passt instead of a TAP.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub user: bool,
    /// Host ports forwarded to the guest (user mode): `tcp:HOST-:GUEST` or
    /// `udp:HOST-:GUEST`, QEMU's `hostfwd` form.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostfwd: Vec<String>,
    /// The adapter's MAC; derived from the VM's name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Let frames with other source MACs out (for guests bridged inside).
    #[serde(default)]
    pub mac_spoofing: bool,
}

fn on_off(v: &str) -> Option<bool> {
    match v {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// Parses `path=FILE[,readonly=on][,serial=ID]` (a bare `FILE` first works
/// too).
pub fn parse_disk(s: &str) -> Result<DiskConfig, AdapterError> {
    let bad = || AdapterError::BadDisk(s.to_owned());
    let mut path = None;
    let mut readonly = false;
    let mut serial = None;
    for (i, part) in s.split(',').enumerate() {
        match part.split_once('=') {
            Some(("path", v)) if !v.is_empty() => path = Some(PathBuf::from(v)),
            Some(("readonly", v)) => readonly = on_off(v).ok_or_else(bad)?,
            Some(("serial", v)) => {
                check_serial(v)?;
                serial = Some(v.to_owned());
            }
            None if i == 0 && !part.is_empty() => path = Some(PathBuf::from(part)),
            _ => return Err(bad()),
        }
    }
    Ok(DiskConfig {
        path: path.ok_or_else(bad)?,
        readonly,
        serial,
    })
}

impl NetConfig {
    /// What the adapter is attached to, for reports and comparisons:
    /// the TAP's name, or `user` for passt.
    pub fn backend(&self) -> String {
        match self.user {
            true => "user".to_owned(),
            false => self.tap.clone(),
        }
    }
}

/// Parses `tap=NAME[,mac=MAC][,mac_spoofing=on|off]` or
/// `user[,hostfwd=tcp:HOST-:GUEST]...[,mac=MAC]`.
pub fn parse_net(s: &str) -> Result<NetConfig, AdapterError> {
    let bad = || AdapterError::BadNet(s.to_owned());
    let mut net = NetConfig {
        tap: String::new(),
        user: false,
        hostfwd: Vec::new(),
        mac: None,
        mac_spoofing: false,
    };
    for (i, part) in s.split(',').enumerate() {
        match part.split_once('=') {
            None if i == 0 && part == "user" => net.user = true,
            Some(("tap", v)) => net.tap = v.to_owned(),
            Some(("hostfwd", v)) => {
                parse_hostfwd(v).ok_or_else(bad)?;
                net.hostfwd.push(v.to_owned());
            }
            Some(("mac", v)) => net.mac = Some(v.to_owned()),
            Some(("mac_spoofing", v)) => net.mac_spoofing = on_off(v).ok_or_else(bad)?,
            _ => return Err(bad()),
        }
    }
    // Exactly one of a TAP and `user`; forwards only for `user`.
    if net.tap.is_empty() != net.user || (!net.user && !net.hostfwd.is_empty()) {
        return Err(bad());
    }
    Ok(net)
}

/// A port forward of a user-mode adapter: (udp, host port, guest port)
/// from `tcp:HOST-:GUEST` or `udp:HOST-:GUEST`.
pub fn parse_hostfwd(s: &str) -> Option<(bool, u16, u16)> {
    let (proto, rest) = s.split_once(':')?;
    let udp = match proto {
        "tcp" => false,
        "udp" => true,
        _ => return None,
    };
    let (host, guest) = rest.split_once("-:")?;
    let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p != 0);
    Some((udp, port(host)?, port(guest)?))
}

/// Parses `52:56:00:00:00:01` (or with '-'); refuses multicast addresses.
pub fn parse_mac(s: &str) -> Result<[u8; 6], AdapterError> {
    let bad = || AdapterError::BadMac(s.to_owned());
    let parts: Vec<_> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(bad());
    }
    Ok(mac)
}

/// Checks a VM's disks, adapters and balloon together.
pub fn validate(
    disks: &[DiskConfig],
    nets: &[NetConfig],
    balloon: Option<&BalloonConfig>,
) -> Result<(), AdapterError> {
    let total = disks.len() + nets.len() + usize::from(balloon.is_some());
    if total > MAX_DEVICES {
        return Err(AdapterError::TooMany(total));
    }
    for (i, n) in nets.iter().enumerate() {
        if let Some(mac) = &n.mac {
            parse_mac(mac)?;
        }
        if n.user {
            if !n.tap.is_empty() || n.hostfwd.iter().any(|h| parse_hostfwd(h).is_none()) {
                return Err(AdapterError::BadNet(format!("user,tap={}", n.tap)));
            }
            continue;
        }
        if !valid_tap_name(&n.tap) {
            return Err(AdapterError::BadTap(n.tap.clone()));
        }
        if nets[..i].iter().any(|o| o.tap == n.tap) {
            return Err(AdapterError::DuplicateTap(n.tap.clone()));
        }
    }
    for (i, d) in disks.iter().enumerate() {
        if disks[..i].iter().any(|o| o.path == d.path) {
            return Err(AdapterError::DuplicateDisk(d.path.clone()));
        }
        if let Some(serial) = &d.serial {
            check_serial(serial)?;
        }
        let serial = d.serial_or_default(i);
        if (0..i).any(|j| disks[j].serial_or_default(j) == serial) {
            return Err(AdapterError::DuplicateSerial(serial));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_flags() {
        assert_eq!(
            parse_disk("path=/a.img,readonly=on").unwrap(),
            DiskConfig {
                path: "/a.img".into(),
                readonly: true,
                serial: None,
            }
        );
        assert_eq!(parse_disk("/b.img").unwrap().path, PathBuf::from("/b.img"));
        assert!(!parse_disk("path=/b.img,readonly=off").unwrap().readonly);
        for bad in [
            "",
            "readonly=on",
            "path=",
            "path=/a,readonly=maybe",
            "path=/a,cache=none",
        ] {
            let e = parse_disk(bad).unwrap_err();
            assert!(e.to_string().contains("path=FILE"), "{bad}: {e}");
        }
    }

    #[test]
    fn disk_serials() {
        let d = parse_disk("path=/a.img,serial=ROOT-01,readonly=on").unwrap();
        assert_eq!(d.serial.as_deref(), Some("ROOT-01"));
        assert_eq!(d.serial_or_default(3), "ROOT-01");
        let d = parse_disk("/a.img").unwrap();
        assert_eq!(d.serial, None);
        assert_eq!(d.serial_or_default(3), "nestvm-disk3");
        assert!(parse_disk("path=/a,serial=12345678901234567890").is_ok());
        for (bad, why) in [
            ("path=/a,serial=", "empty"),
            ("path=/a,serial=123456789012345678901", "longer than 20"),
            ("path=/a,serial=caf\u{e9}", "not printable"),
            ("path=/a,serial=a\tb", "not printable"),
            ("path=/a,serial=a\nb", "not printable"),
        ] {
            let e = parse_disk(bad).unwrap_err();
            assert!(matches!(e, AdapterError::BadSerial { .. }), "{bad}: {e}");
            let text = e.to_string();
            assert!(
                text.contains(why) && text.contains("printable ASCII"),
                "{text}"
            );
            assert!(!text.contains('\n'), "one line: {text}");
        }
    }

    #[test]
    fn serials_are_checked_and_unique_per_vm() {
        let d = |p: &str, serial: Option<&str>| DiskConfig {
            path: p.into(),
            readonly: false,
            serial: serial.map(str::to_owned),
        };
        assert!(validate(&[d("/a", Some("x")), d("/b", None)], &[], None).is_ok());
        assert!(matches!(
            validate(&[d("/a", Some("x")), d("/b", Some("x"))], &[], None),
            Err(AdapterError::DuplicateSerial(s)) if s == "x"
        ));
        // A given serial may not take another disk's default.
        assert!(matches!(
            validate(&[d("/a", Some("nestvm-disk1")), d("/b", None)], &[], None),
            Err(AdapterError::DuplicateSerial(_))
        ));
        // Files are checked like flags.
        assert!(matches!(
            validate(&[d("/a", Some("much too long for a disk id"))], &[], None),
            Err(AdapterError::BadSerial { .. })
        ));
    }

    #[test]
    fn user_nets_and_their_forwards() {
        let n = parse_net("user,hostfwd=tcp:2222-:22,hostfwd=udp:5353-:53").unwrap();
        assert!(n.user && n.tap.is_empty());
        assert_eq!(n.hostfwd, ["tcp:2222-:22", "udp:5353-:53"]);
        assert_eq!(n.backend(), "user");
        assert_eq!(parse_hostfwd("tcp:8080-:80"), Some((false, 8080, 80)));
        assert!(validate(&[], &[n.clone(), n.clone()], None).is_ok());
        for bad in [
            "user,tap=tap0",
            "tap=tap0,hostfwd=tcp:1-:2",
            "hostfwd=tcp:1-:2",
            "user,hostfwd=tcp:1:2",
            "user,hostfwd=sctp:1-:2",
            "user,hostfwd=tcp:0-:22",
            "user,hostfwd=tcp:70000-:22",
            "tap=t0,user",
        ] {
            assert!(parse_net(bad).is_err(), "{bad}");
        }
        // A definition file is checked as strictly as the flag.
        let mut edited = parse_net("user").unwrap();
        edited.hostfwd.push("tcp:x-:1".into());
        assert!(validate(&[], &[edited], None).is_err());
        // TOML round trip: a TAP adapter's file does not change shape.
        let toml = toml::to_string(&parse_net("tap=t0").unwrap()).unwrap();
        assert!(
            !toml.contains("user") && !toml.contains("hostfwd"),
            "{toml}"
        );
    }

    #[test]
    fn net_flags_and_macs() {
        let n = parse_net("tap=tap0,mac=52:56:00:00:00:01,mac_spoofing=on").unwrap();
        assert_eq!((n.tap.as_str(), n.mac_spoofing), ("tap0", true));
        assert_eq!(
            parse_mac(n.mac.as_deref().unwrap()).unwrap(),
            [0x52, 0x56, 0, 0, 0, 1]
        );
        assert!(!parse_net("tap=t1").unwrap().mac_spoofing);
        for bad in [
            "",
            "mac=52:56:00:00:00:01",
            "tap=t,speed=10",
            "tap=t,mac_spoofing=perhaps",
        ] {
            assert!(parse_net(bad).is_err(), "{bad}");
        }
        for bad in [
            "52:56:00:00:00",
            "zz:56:00:00:00:01",
            "01:00:5e:00:00:01",
            "525600000001",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn combined_checks() {
        let n = |t: &str| NetConfig {
            tap: t.into(),
            mac: None,
            mac_spoofing: false,
            ..Default::default()
        };
        let d = |p: &str| DiskConfig {
            path: p.into(),
            readonly: false,
            serial: None,
        };
        assert!(validate(&[d("/a"), d("/b")], &[n("t0"), n("t1")], None).is_ok());
        assert!(matches!(
            validate(&[], &[n("t0"), n("t0")], None),
            Err(AdapterError::DuplicateTap(_))
        ));
        assert!(matches!(
            validate(&[d("/a"), d("/a")], &[], None),
            Err(AdapterError::DuplicateDisk(_))
        ));
        assert!(matches!(
            validate(&[], &[n("bad name")], None),
            Err(AdapterError::BadTap(_))
        ));
        assert!(valid_tap_name("tap0") && valid_tap_name("nv-web.1_x"));
        for bad in ["", "a/b", "sixteen-chars-xx", "tap 0", "t\u{e9}"] {
            assert!(!valid_tap_name(bad), "{bad:?}");
        }
        let many: Vec<_> = (0..=MAX_DEVICES).map(|i| d(&format!("/d{i}"))).collect();
        assert!(matches!(
            validate(&many, &[], None),
            Err(AdapterError::TooMany(_))
        ));
        // The balloon takes a slot too.
        let b = parse_balloon("on").unwrap();
        assert!(validate(&many[1..], &[], None).is_ok());
        assert!(validate(&many[1..], &[], Some(&b)).is_err());
    }

    #[test]
    fn balloons() {
        let b = parse_balloon("dynamic=on,min=1G,start=2G").unwrap();
        assert!(b.dynamic);
        assert_eq!(b.min_bytes().unwrap(), 1 << 30);
        assert_eq!(b.start_bytes().unwrap(), Some(2 << 30));
        let b = parse_balloon("on").unwrap();
        assert!(!b.dynamic);
        assert_eq!(b.min_bytes().unwrap(), 256 << 20);
        assert_eq!(b.start_bytes().unwrap(), None);
        for bad in [
            "",
            "off",
            "dynamic=maybe",
            "min=lots",
            "start=",
            "size=1G",
            "on,on",
        ] {
            assert!(parse_balloon(bad).is_err(), "{bad}");
        }
    }
}
