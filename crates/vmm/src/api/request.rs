//! Turning a request line into a typed [`Request`]: the method and path
//! pick an [`Action`] (or a 404/405 [`Refusal`]), and the query string is
//! parsed into the action's parameters (or a 400). Runs on the API thread,
//! so the controller only ever sees well-formed requests. A migration's
//! secret comes in a header ([`super::SECRET_HEADER`]) or is read here from
//! the file the query names: the secret itself never travels in a URL.

use std::path::Path;
use std::time::Duration;

use crate::secret::{self, Psk};

/// The downtime budget of a migration when none is given (the issue's
/// target; QEMU and Cloud Hypervisor default to 300 ms).
pub const DEFAULT_MAX_DOWNTIME: Duration = Duration::from_millis(50);
/// The smallest migration bandwidth cap accepted, bytes per second: a 1 MiB
/// batch every 16 s stays well inside the receiver's I/O timeout.
pub const MIN_BANDWIDTH: u64 = 64 << 10;

/// Parameters of one outgoing migration.
pub struct MigrateRequest {
    /// `HOST:PORT` of the receiver.
    pub to: String,
    /// The migration secret, from its header or the file `token_file=` names.
    pub key: Psk,
    /// The downtime budget.
    pub max_downtime: Duration,
    /// The most bytes per second the pre-copy rounds may send (`None`:
    /// as fast as the link goes). The final copy, with the VM paused, is
    /// not capped: it would only lengthen the downtime.
    pub max_bandwidth: Option<u64>,
    /// Have the receiver check a digest of all memory before it resumes
    /// the VM (costs downtime: for tests and the suspicious).
    pub verify: bool,
    /// Slow a guest that writes memory faster than the copy goes, so that
    /// pre-copy ends ([`crate::migration::converge`]).
    pub auto_converge: bool,
}

impl std::fmt::Debug for MigrateRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token: requests end up in logs.
        f.debug_struct("MigrateRequest")
            .field("to", &self.to)
            .field("max_downtime", &self.max_downtime)
            .field("max_bandwidth", &self.max_bandwidth)
            .field("verify", &self.verify)
            .field("auto_converge", &self.auto_converge)
            .finish_non_exhaustive()
    }
}

/// An action the run loop carries out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// GET /v1/vm.
    Info,
    /// PUT /v1/vm/pause.
    Pause,
    /// PUT /v1/vm/resume.
    Resume,
    /// PUT /v1/vm/power-button.
    PowerButton,
    /// PUT /v1/vm/kill.
    Kill,
    /// PUT /v1/vm/save: pause, save state and memory, stop.
    Save,
    /// PUT /v1/vm/checkpoint?name=C[&parent=P]: pause, write a checkpoint,
    /// carry on as before.
    Checkpoint,
    /// PUT /v1/vm/migrate?to=HOST:PORT&token_file=PATH[&max_downtime_ms=N][&max_bandwidth=B]:
    /// start a live migration.
    Migrate,
    /// GET /v1/vm/migration: the current or last migration's progress.
    Migration,
    /// GET /v1/vm/memory: the balloon's policy, state and guest statistics.
    Memory,
    /// PUT /v1/vm/memory?size=BYTES (or ?size=auto): resize the VM's memory.
    Resize,
    /// GET /v1/vm/agent: whether the guest's agent answers.
    Agent,
    /// PUT /v1/vm/exec: run a command in the guest.
    Exec,
    /// GET /v1/vm/file?path=P: a piece of a guest's file.
    FileRead,
    /// PUT /v1/vm/file?path=P: write a piece of a guest's file.
    FileWrite,
}

impl Action {
    /// Whether the guest thread (`super::guest`), not the controller,
    /// answers it.
    pub fn is_guest(self) -> bool {
        matches!(
            self,
            Self::Agent | Self::Exec | Self::FileRead | Self::FileWrite
        )
    }
}

/// A well-formed request for the controller.
#[derive(Debug)]
pub enum Request {
    /// GET /v1/vm.
    Info,
    /// PUT /v1/vm/pause.
    Pause,
    /// PUT /v1/vm/resume.
    Resume,
    /// PUT /v1/vm/power-button.
    PowerButton,
    /// PUT /v1/vm/kill.
    Kill,
    /// PUT /v1/vm/save.
    Save,
    /// PUT /v1/vm/checkpoint?name=C[&parent=P].
    Checkpoint {
        /// The new checkpoint's name (checked against the tree by the
        /// controller, which knows where it is).
        name: String,
        /// The checkpoint it descends from, if any.
        parent: Option<String>,
    },
    /// PUT /v1/vm/migrate?to=&token_file=[&max_downtime_ms=][&max_bandwidth=][&verify=1][&auto_converge=0].
    Migrate(MigrateRequest),
    /// GET /v1/vm/migration.
    Migration,
    /// GET /v1/vm/memory.
    Memory,
    /// PUT /v1/vm/memory?size=BYTES|auto (`None`: the automatic policy).
    Resize(Option<u64>),
}

impl Request {
    /// The request `action` with the query's `key=value` pairs, or a 400.
    pub fn parse(
        action: Action,
        query: &[(String, String)],
        secret: Option<&str>,
    ) -> Result<Self, Refusal> {
        let get = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.as_str());
        let bad = |why: String| Refusal::new(400, why);
        Ok(match action {
            Action::Info => Self::Info,
            Action::Pause => Self::Pause,
            Action::Resume => Self::Resume,
            Action::PowerButton => Self::PowerButton,
            Action::Kill => Self::Kill,
            Action::Save => Self::Save,
            Action::Migration => Self::Migration,
            Action::Memory => Self::Memory,
            Action::Checkpoint => Self::Checkpoint {
                name: get("name")
                    .ok_or_else(|| bad("no checkpoint name given (name=NAME)".into()))?
                    .to_owned(),
                parent: get("parent").filter(|p| !p.is_empty()).map(str::to_owned),
            },
            Action::Resize => Self::Resize(match get("size") {
                Some("auto") => None,
                Some(v) => Some(
                    v.parse()
                        .map_err(|_| bad(format!("size={v} is not a number of bytes or auto")))?,
                ),
                None => return Err(bad("no size given (size=BYTES or size=auto)".into())),
            }),
            Action::Migrate => Self::Migrate(migrate(&get, secret)?),
            Action::Agent | Action::Exec | Action::FileRead | Action::FileWrite => {
                return Err(bad(format!(
                    "{action:?} is a guest-agent request, not one for the controller"
                )))
            }
        })
    }
}

/// The parameters of `PUT /v1/vm/migrate`.
fn migrate<'a>(
    get: &dyn Fn(&str) -> Option<&'a str>,
    secret: Option<&str>,
) -> Result<MigrateRequest, Refusal> {
    let bad = |why: String| Refusal::new(400, why);
    let to = get("to").ok_or_else(|| bad("no destination given (to=HOST:PORT)".into()))?;
    if get("token").is_some() {
        return Err(bad(
            "token= is not taken: give token_file=PATH, the secret's file (a secret stays out of URLs)"
                .into(),
        ));
    }
    let key = match (secret, get("token_file")) {
        (Some(_), Some(_)) => {
            return Err(bad(format!(
                "the secret is given twice ({} and token_file=): give one",
                super::SECRET_HEADER
            )))
        }
        // A VMM that gave up root may not be able to read the file: its
        // owner's client reads it and sends the secret itself.
        (Some(text), None) => secret::parse(text).map_err(|why| {
            bad(format!(
                "the {} header is no migration secret: {why}",
                super::SECRET_HEADER
            ))
        })?,
        (None, file) => {
            let file = file
                .map(Path::new)
                .filter(|p| p.is_absolute())
                .ok_or_else(|| {
                    bad(format!(
                        "no migration secret given (token_file=ABSOLUTE-PATH or the {} header)",
                        super::SECRET_HEADER
                    ))
                })?;
            secret::read(file).map_err(|e| bad(crate::persist::capture::chain_text(&e)))?
        }
    };
    let max_downtime = match get("max_downtime_ms") {
        None => DEFAULT_MAX_DOWNTIME,
        Some(v) => Duration::from_millis(v.parse().map_err(|_| {
            bad(format!(
                "max_downtime_ms={v} is not a number of milliseconds"
            ))
        })?),
    };
    let max_bandwidth = match get("max_bandwidth").map(str::parse::<u64>) {
        None | Some(Ok(0)) => None,
        Some(Ok(b)) if b >= MIN_BANDWIDTH => Some(b),
        Some(_) => {
            return Err(bad(format!(
                "max_bandwidth={} is not a rate: give bytes per second, at least {MIN_BANDWIDTH} (0 for no cap)",
                get("max_bandwidth").unwrap_or_default()
            )))
        }
    };
    let auto_converge = match get("auto_converge") {
        None | Some("1") => true,
        Some("0") => false,
        Some(v) => {
            return Err(bad(format!(
                "auto_converge={v} is neither 0 (never slow the guest) nor 1 (the default)"
            )))
        }
    };
    Ok(MigrateRequest {
        to: to.to_owned(),
        key,
        max_downtime,
        max_bandwidth,
        verify: get("verify") == Some("1"),
        auto_converge,
    })
}

/// The `key=value` pairs after `?` in `path`, each percent-decoded (a
/// file's path may hold any character).
pub fn parse_query(path: &str) -> Vec<(String, String)> {
    path.split_once('?')
        .map(|(_, q)| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (percent_decode(k), percent_decode(v)))
                .collect()
        })
        .unwrap_or_default()
}

/// `s` with each `%XX` turned into its byte (a `%` not followed by two hex
/// digits stays as it is).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let byte = b
            .get(i + 1..i + 3)
            .filter(|h| b[i] == b'%' && h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match byte {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `s` percent-encoded for a query value: all but letters, digits and
/// `-._~/` (what [`parse_query`] decodes).
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Why the server itself refused a request, before the run loop saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The HTTP status.
    pub status: u16,
    /// The message.
    pub error: String,
    /// For 405: the method the path takes.
    pub allow: Option<&'static str>,
}

impl Refusal {
    pub(crate) fn new(status: u16, error: String) -> Self {
        Refusal {
            status,
            error,
            allow: None,
        }
    }
}

/// Maps a method and path to an action, or a refusal.
pub fn route(method: &str, path: &str) -> Result<Action, Refusal> {
    let path = path.split('?').next().unwrap_or_default();
    let action = match path {
        "/v1/vm" => Action::Info,
        "/v1/vm/pause" => Action::Pause,
        "/v1/vm/resume" => Action::Resume,
        "/v1/vm/power-button" => Action::PowerButton,
        "/v1/vm/kill" => Action::Kill,
        "/v1/vm/save" => Action::Save,
        "/v1/vm/checkpoint" => Action::Checkpoint,
        "/v1/vm/migrate" => Action::Migrate,
        "/v1/vm/migration" => Action::Migration,
        "/v1/vm/memory" if method == "PUT" => Action::Resize,
        "/v1/vm/memory" => Action::Memory,
        "/v1/vm/agent" => Action::Agent,
        "/v1/vm/exec" => Action::Exec,
        "/v1/vm/file" if method == "PUT" => Action::FileWrite,
        "/v1/vm/file" => Action::FileRead,
        _ => return Err(Refusal::new(404, format!("no such endpoint {path}"))),
    };
    // What the path takes (the Allow header of a 405), and whether this
    // method is one of it (/v1/vm/memory routes PUT to Resize above).
    let (allow, ok) = match action {
        Action::Info | Action::Migration | Action::Agent => ("GET", method == "GET"),
        Action::Memory | Action::Resize | Action::FileRead | Action::FileWrite => {
            ("GET, PUT", matches!(method, "GET" | "PUT"))
        }
        _ => ("PUT", method == "PUT"),
    };
    if !ok {
        return Err(Refusal {
            status: 405,
            error: format!("{path} takes {allow}, not {method}"),
            allow: Some(allow),
        });
    }
    Ok(action)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(action: Action, query: &str) -> Result<Request, Refusal> {
        Request::parse(action, &parse_query(&format!("/x?{query}")), None)
    }

    #[test]
    fn routes() {
        assert_eq!(route("GET", "/v1/vm"), Ok(Action::Info));
        assert_eq!(route("PUT", "/v1/vm/pause"), Ok(Action::Pause));
        assert_eq!(route("PUT", "/v1/vm/kill"), Ok(Action::Kill));
        assert_eq!(route("PUT", "/v1/vm/migrate?to=a:1"), Ok(Action::Migrate));
        assert_eq!(route("GET", "/v1/vm/migration"), Ok(Action::Migration));
        assert_eq!(route("GET", "/v1/vm/memory"), Ok(Action::Memory));
        assert_eq!(route("PUT", "/v1/vm/memory?size=auto"), Ok(Action::Resize));
        let refused = |m, p| route(m, p).unwrap_err();
        assert_eq!(refused("POST", "/v1/vm/memory").allow, Some("GET, PUT"));
        assert_eq!(refused("PUT", "/v1/vm/migration").allow, Some("GET"));
        assert_eq!(refused("PUT", "/v1/vm").status, 405);
        assert_eq!(refused("GET", "/v1/vm/pause").allow, Some("PUT"));
        let missing = refused("GET", "/etc/passwd");
        assert_eq!((missing.status, missing.allow), (404, None));
    }

    #[test]
    fn queries_become_typed_requests_or_400() {
        assert!(matches!(
            parse(Action::Checkpoint, "name=a&parent="),
            Ok(Request::Checkpoint { name, parent: None }) if name == "a"
        ));
        assert!(matches!(
            parse(Action::Checkpoint, "name=a&parent=b"),
            Ok(Request::Checkpoint { parent: Some(p), .. }) if p == "b"
        ));
        assert!(matches!(
            parse(Action::Resize, "size=auto"),
            Ok(Request::Resize(None))
        ));
        assert!(matches!(
            parse(Action::Resize, "size=1048576"),
            Ok(Request::Resize(Some(1048576)))
        ));
        let dir = std::env::temp_dir().join(format!("nestvm-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("odd name&=%.key");
        let _ = std::fs::remove_file(&file);
        let key = secret::create(&file).unwrap();
        let file_q = percent_encode(file.to_str().unwrap());
        let Ok(Request::Migrate(m)) = parse(
            Action::Migrate,
            &format!("to=h:1&token_file={file_q}&max_downtime_ms=9&max_bandwidth=0&verify=1"),
        ) else {
            panic!("a good migrate request refused")
        };
        assert_eq!((m.to.as_str(), &m.key), ("h:1", &key));
        assert_eq!(
            (m.max_downtime, m.max_bandwidth, m.verify, m.auto_converge),
            (Duration::from_millis(9), None, true, true)
        );
        let Ok(Request::Migrate(m)) = parse(
            Action::Migrate,
            &format!("to=h:1&token_file={file_q}&auto_converge=0"),
        ) else {
            panic!("auto_converge=0 refused")
        };
        assert!(!m.auto_converge);
        let weak = dir.join("weak");
        std::fs::write(&weak, "0123456789abcdef\n").unwrap();
        let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
        std::fs::set_permissions(&weak, private).unwrap();
        let good = format!("to=h:1&token_file={file_q}");
        let weak = format!("to=h:1&token_file={}", weak.display());
        let cases = [
            (Action::Checkpoint, "parent=b", "no checkpoint name"),
            (Action::Resize, "", "no size"),
            (Action::Resize, "size=-1", "is not a number"),
            (Action::Migrate, "token_file=/x", "no destination"),
            (Action::Migrate, "to=h:1&token=00ff", "token_file=PATH"),
            (
                Action::Migrate,
                "to=h:1&token_file=rel",
                "no migration secret",
            ),
            (Action::Migrate, "to=h:1", "no migration secret"),
            (
                Action::Migrate,
                "to=h:1&token_file=/nonexistent",
                "cannot read",
            ),
            (Action::Migrate, &weak, "migration secret"),
            (
                Action::Migrate,
                &format!("{good}&max_downtime_ms=x"),
                "milliseconds",
            ),
            (
                Action::Migrate,
                &format!("{good}&max_bandwidth=5"),
                "at least",
            ),
            (
                Action::Migrate,
                &format!("{good}&auto_converge=yes"),
                "neither 0",
            ),
        ];
        for (action, query, says) in cases {
            let r = parse(action, query).unwrap_err();
            assert_eq!(r.status, 400, "{query}");
            assert!(r.error.contains(says), "{query}: {}", r.error);
        }
    }

    /// The secret in its header, as `nestvm vm migrate` sends it to a VMM
    /// that cannot read the file; a bad one, or a second one, is refused.
    #[test]
    fn a_migration_secret_comes_in_its_header_or_a_file_not_both() {
        let key = Psk::random().unwrap();
        let hex = key.hex();
        let query = parse_query("/x?to=h:1");
        let Ok(Request::Migrate(m)) = Request::parse(Action::Migrate, &query, Some(&hex)) else {
            panic!("a secret in its header refused")
        };
        assert_eq!(m.key, key);
        let both = parse_query("/x?to=h:1&token_file=/x");
        let weak = "ab".repeat(32);
        for (q, secret, says) in [
            (&both, hex.as_str(), "given twice"),
            (&query, "00ff", "no migration secret: not 64 hex"),
            (&query, weak.as_str(), "too regular"),
        ] {
            let r = Request::parse(Action::Migrate, q, Some(secret)).unwrap_err();
            assert_eq!(r.status, 400);
            assert!(r.error.contains(says), "{secret}: {}", r.error);
        }
    }

    #[test]
    fn query_values_are_percent_decoded() {
        let q = parse_query("/x?a=%2Fb%20c%26&b=100%&c=%zz%+1");
        assert_eq!(q[0], ("a".into(), "/b c&".into()));
        assert_eq!(q[1], ("b".into(), "100%".into()));
        assert_eq!(q[2], ("c".into(), "%zz%+1".into()));
        let odd = "/tmp/a b&c=d%e?f#g/é";
        let enc = percent_encode(odd);
        assert!(!enc.contains(['&', '?', '#', ' ', '=']), "{enc}");
        assert_eq!(parse_query(&format!("/x?p={enc}"))[0].1, odd);
    }
}
