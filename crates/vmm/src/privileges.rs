//! Giving up root: a VMM started as root opens what only root may open
//! (`/dev/kvm` where it is root's, TAPs, disk images and devices), builds
//! its VM, and then, before any thread of its own starts and before the
//! guest runs a single instruction, becomes an unprivileged user for good
//! ([`drop_to`]): supplementary groups, then the group, then the user, all
//! three of real, effective and saved IDs, so that nothing can switch back.
//! What it opened stays open; what it opens later it opens with that
//! user's rights (inside the Landlock view of [`crate::jail`]).
//!
//! The process is also made non-dumpable: VMMs that share the user (the
//! default, `nobody`) cannot trace each other, read each other's memory or
//! reach each other's directories through `/proc`.

use nix::unistd::{Gid, Group, Uid, User};

/// The user a VMM run as root becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmUser {
    /// Its name (or the number given).
    pub name: String,
    /// Its user ID.
    pub uid: u32,
    /// Its group ID.
    pub gid: u32,
}

/// Why a user could not be had, or become.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// No such user.
    #[error("no user '{0}' on this host: give an existing one with --vmm-user USER[:GROUP] (or UID:GID)")]
    NoUser(String),
    /// No such group.
    #[error(
        "no group '{0}' on this host: give an existing one with --vmm-user USER:GROUP (or UID:GID)"
    )]
    NoGroup(String),
    /// Root is no user to drop to.
    #[error(
        "--vmm-user {0} names root: give an unprivileged user (or 'root' to keep root's rights)"
    )]
    Root(String),
    /// The user database could not be read.
    #[error("cannot look up '{name}' in the user database")]
    Lookup {
        /// The name.
        name: String,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// A step of the switch failed.
    #[error("cannot {step} (the VMM would stay root)")]
    Switch {
        /// Which step.
        step: &'static str,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// The switch could be undone: it did not happen as it must.
    #[error("the VMM could take root's rights back after giving them up")]
    Reversible,
}

fn lookup<T>(name: &str, r: nix::Result<Option<T>>) -> Result<Option<T>, PrivilegeError> {
    r.map_err(|source| PrivilegeError::Lookup {
        name: name.to_owned(),
        source,
    })
}

impl VmmUser {
    /// `USER[:GROUP]`, either a name or a number (a user without a group
    /// takes its own primary group; a number not in the database needs its
    /// group given).
    pub fn resolve(spec: &str) -> Result<Self, PrivilegeError> {
        let (user, group) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        let (uid, primary) = match user.parse::<u32>() {
            Ok(n) => (
                n,
                lookup(user, User::from_uid(Uid::from_raw(n)))?.map(|u| u.gid),
            ),
            Err(_) => {
                let u = lookup(user, User::from_name(user))?
                    .ok_or_else(|| PrivilegeError::NoUser(user.to_owned()))?;
                (u.uid.as_raw(), Some(u.gid))
            }
        };
        let gid = match group {
            Some(g) => match g.parse::<u32>() {
                Ok(n) => n,
                Err(_) => lookup(g, Group::from_name(g))?
                    .ok_or_else(|| PrivilegeError::NoGroup(g.to_owned()))?
                    .gid
                    .as_raw(),
            },
            None => primary
                .ok_or_else(|| PrivilegeError::NoGroup(format!("of user {user}")))?
                .as_raw(),
        };
        if uid == 0 || gid == 0 {
            return Err(PrivilegeError::Root(spec.to_owned()));
        }
        Ok(Self {
            name: user.to_owned(),
            uid,
            gid,
        })
    }
}

/// Whether this process runs as root (and so has privileges to drop).
pub fn is_root() -> bool {
    Uid::effective().is_root()
}

/// Becomes `user` for good. Must run before the VMM starts threads of its
/// own: the switch reaches every thread (glibc signals each), and a thread
/// under a seccomp filter that does not allow it would be killed.
pub fn drop_to(user: &VmmUser) -> Result<(), PrivilegeError> {
    let step = |step| move |source| PrivilegeError::Switch { step, source };
    let (uid, gid) = (Uid::from_raw(user.uid), Gid::from_raw(user.gid));
    nix::unistd::setgroups(&[gid]).map_err(step("drop root's groups"))?;
    nix::unistd::setresgid(gid, gid, gid).map_err(step("switch group"))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(step("switch user"))?;
    nix::sys::prctl::set_dumpable(false).map_err(step("make the VMM non-dumpable"))?;
    // Saved IDs included, nothing may lead back.
    if nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)).is_ok()
        || Uid::effective() != uid
        || Gid::effective() != gid
    {
        return Err(PrivilegeError::Reversible);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_resolved_by_name_or_number_and_root_is_refused() {
        let nobody = User::from_name("nobody").unwrap();
        if let Some(n) = nobody {
            let u = VmmUser::resolve("nobody").unwrap();
            assert_eq!((u.uid, u.gid), (n.uid.as_raw(), n.gid.as_raw()));
            let by_number = VmmUser::resolve(&format!("{}", n.uid)).unwrap();
            assert_eq!(by_number.gid, n.gid.as_raw());
        }
        assert_eq!(VmmUser::resolve("64000:64000").unwrap().uid, 64000);
        for (spec, want) in [
            ("root", "names root"),
            ("0:5", "names root"),
            ("no-such-user-here", "no user"),
            ("nobody:no-such-group-here", "no group"),
            ("64001", "no group"),
        ] {
            let e = VmmUser::resolve(spec).unwrap_err().to_string();
            assert!(e.contains(want), "{spec}: {e}");
        }
    }

    /// The child's side of the test below, in a process of its own (the
    /// switch is for the whole process): what it sees once it dropped.
    #[test]
    fn dropped_child() {
        if std::env::var_os("NESTVM_DROP_CHILD").is_none() {
            return; // run only as the child of the test below
        }
        let user = VmmUser::resolve("64002:64002").unwrap();
        drop_to(&user).unwrap();
        println!(
            "DROPPED uid={} gid={} groups={:?} dumpable={} setuid0={} shadow={}",
            Uid::current(),
            Gid::current(),
            nix::unistd::getgroups().unwrap(),
            nix::sys::prctl::get_dumpable().unwrap(),
            nix::unistd::setuid(Uid::from_raw(0)).is_ok(),
            std::fs::File::open("/etc/shadow").is_ok(),
        );
    }

    #[test]
    fn a_dropped_process_cannot_become_root_again() {
        if !is_root() {
            eprintln!("SKIPPED: needs root");
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "privileges::tests::dropped_child", "--nocapture"])
            .env("NESTVM_DROP_CHILD", "1")
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{said}");
        let line = said
            .lines()
            .find(|l| l.starts_with("DROPPED"))
            .unwrap_or_default();
        assert_eq!(
            line,
            "DROPPED uid=64002 gid=64002 groups=[Gid(64002)] dumpable=false setuid0=false shadow=false"
        );
    }
}
