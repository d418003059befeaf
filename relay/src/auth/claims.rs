//! What a verified token says: its user (`sub`), its scopes, its other claims, and the
//! identity the relay takes from them.
//!
//! `sub` names the user; `scope` says what the token may do: `agent` tokens open a tunnel for a
//! device, `client` tokens send API requests to that user's devices. The relay's own tokens
//! carry one scope (`"scope": "agent"`); an identity provider's carry a space-separated list
//! (`"openid agent client"`) or an array, and a token has every scope its list names. The
//! user id is written into logs and the audit log, so [`valid_subject`] bounds it.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest user id (`sub`) accepted, in bytes: 256. Identity providers' subjects are UUIDs or
/// `provider|id` strings of a few dozen bytes (an e-mail address, at most 254); the bound keeps
/// every log line and audit record that names the user small.
pub const MAX_SUBJECT_BYTES: usize = 256;

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// May open a tunnel for one of the user's devices (the daemon's token).
    Agent,
    /// May send API requests to the user's devices (browsers, SDKs, scripts).
    Client,
}

impl Scope {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Scope::Agent => "agent",
            Scope::Client => "client",
        }
    }
}

/// The cloudllm scopes a token carries. On the wire it is the `scope` claim: a space-separated
/// string (OAuth 2.0's form, RFC 8693 §4.2) or an array of strings; scopes other than `agent`
/// and `client` (`openid`, `offline_access` …) are ignored. Serialized as the string form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scopes {
    agent: bool,
    client: bool,
}

impl Scopes {
    /// Both scopes: the token may open tunnels and send requests.
    pub const ALL: Scopes = Scopes {
        agent: true,
        client: true,
    };

    /// Whether `scope` is among these.
    pub fn has(self, scope: Scope) -> bool {
        match scope {
            Scope::Agent => self.agent,
            Scope::Client => self.client,
        }
    }

    /// Adds the scopes named in a space-separated list.
    fn add_words(&mut self, words: &str) {
        for word in words.split_ascii_whitespace() {
            match word {
                "agent" => self.agent = true,
                "client" => self.client = true,
                _ => {}
            }
        }
    }

    /// The space-separated form.
    pub(super) fn words(self) -> &'static str {
        match (self.agent, self.client) {
            (true, true) => "agent client",
            (true, false) => "agent",
            (false, true) => "client",
            (false, false) => "",
        }
    }
}

impl From<Scope> for Scopes {
    fn from(scope: Scope) -> Self {
        let mut scopes = Scopes::default();
        scopes.add_words(scope.as_str());
        scopes
    }
}

impl Serialize for Scopes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.words())
    }
}

impl<'de> Deserialize<'de> for Scopes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Words(String),
            List(Vec<String>),
        }
        let mut scopes = Scopes::default();
        match Wire::deserialize(deserializer)? {
            Wire::Words(words) => scopes.add_words(&words),
            Wire::List(list) => list.iter().for_each(|words| scopes.add_words(words)),
        }
        Ok(scopes)
    }
}

/// The claims of a cloudllm token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user.
    pub sub: String,
    /// What the token may do. A token without `agent` or `client` here is no cloudllm token
    /// and fails verification.
    #[serde(default)]
    pub scope: Scopes,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issue time, seconds since the Unix epoch.
    #[serde(default)]
    pub iat: u64,
    /// Who minted the token.
    #[serde(default)]
    pub iss: String,
    /// Every other claim (`tier`, `app_metadata` …), for the tier claim path.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

impl Claims {
    /// The string at a dotted claim path (`tier`, `app_metadata.tier`), if there is one.
    pub fn string_at(&self, path: &str) -> Option<&str> {
        let mut parts = path.split('.');
        let mut value = self.other.get(parts.next()?)?;
        for part in parts {
            value = value.get(part)?;
        }
        value.as_str()
    }
}

/// How claims beyond signature and expiry are read, from the relay's config.
#[derive(Debug, Clone, Default)]
pub struct ClaimRules {
    /// Dotted path of the claim naming the user's tier (`tier`, `app_metadata.tier`).
    pub tier_path: String,
    /// Scopes a verified token has when it names no cloudllm scope. Empty by default: such a
    /// token is some other application's and is refused. An identity provider whose tokens
    /// carry no scopes (Supabase) sets both.
    pub implicit_scopes: Scopes,
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user (`sub`).
    pub user: String,
    /// The user's tier, if the token names one.
    pub tier: Option<String>,
    /// When the token expires, seconds since the Unix epoch.
    pub expires_at: u64,
}

/// Whether `sub` can name a user in logs and limits: not empty, at most [`MAX_SUBJECT_BYTES`],
/// and free of characters that would break or disguise a log line: control characters
/// (newlines above all), Unicode line and paragraph separators, and bidirectional overrides
/// (which make a line display in another order than it is written).
pub fn valid_subject(sub: &str) -> bool {
    !sub.is_empty()
        && sub.len() <= MAX_SUBJECT_BYTES
        && !sub.chars().any(|c| {
            c.is_control()
                || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scopes(json: &str) -> Scopes {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn scope_lists_name_every_scope_they_contain() {
        assert!(scopes(r#""agent""#).has(Scope::Agent));
        assert!(!scopes(r#""agent""#).has(Scope::Client));
        let both = scopes(r#""openid agent  client offline_access""#);
        assert!(both.has(Scope::Agent) && both.has(Scope::Client));
        let oidc = scopes(r#""openid agent""#);
        assert!(oidc.has(Scope::Agent) && !oidc.has(Scope::Client));
        let array = scopes(r#"["openid", "client"]"#);
        assert!(array.has(Scope::Client) && !array.has(Scope::Agent));
        // Words, not substrings.
        let near = scopes(r#""agents clientele agent:read""#);
        assert_eq!(near, Scopes::default());
        assert_eq!(scopes(r#""""#), Scopes::default());
        assert!(serde_json::from_str::<Scopes>("42").is_err());

        // Issued tokens keep the single-word form.
        assert_eq!(
            serde_json::to_string(&Scopes::from(Scope::Agent)).unwrap(),
            r#""agent""#
        );
        assert_eq!(
            serde_json::to_string(&Scopes::from(Scope::Client)).unwrap(),
            r#""client""#
        );
        assert_eq!(serde_json::to_string(&both).unwrap(), r#""agent client""#);
    }
}
