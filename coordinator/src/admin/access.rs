//! Who an operator is and what they may do, decided once per request before
//! any handler runs.
//!
//! Operators present a bearer token. Each configured token has a name (the
//! actor in the audit log), a role and a tenant scope:
//!
//! | role | may |
//! |---|---|
//! | `viewer` | read everything in scope |
//! | `config_editor` | read; create config versions, put and delete assignments |
//! | `rollout_operator` | read; start, pause, resume, abort and roll back rollouts |
//! | `operator` | both of the above |
//! | `admin` | everything, agent API keys included |
//!
//! A token scoped to one tenant acts on that tenant only (a `Fleetplane-Tenant`
//! header naming another is refused with 403); a token scoped to `*` acts on
//! the tenant the header names (default `default`). Tokens are compared in
//! constant time; their values never reach a log or an error.

use std::fmt;

use axum::http::Method;
use fleetplane_proto::TenantId;
use serde::Deserialize;

/// What an operator may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads only.
    Viewer,
    /// Reads; writes configs and assignments.
    ConfigEditor,
    /// Reads; commands rollouts.
    RolloutOperator,
    /// Config editor and rollout operator.
    Operator,
    /// Everything.
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Viewer => "viewer",
            Self::ConfigEditor => "config_editor",
            Self::RolloutOperator => "rollout_operator",
            Self::Operator => "operator",
            Self::Admin => "admin",
        })
    }
}

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Any read.
    Read,
    /// Config versions and assignments.
    WriteConfigs,
    /// Rollouts and their commands.
    WriteRollouts,
    /// Agent API keys (reading them too).
    ManageKeys,
}

impl Role {
    /// Whether this role grants `permission`.
    pub fn allows(self, permission: Permission) -> bool {
        match permission {
            Permission::Read => true,
            Permission::WriteConfigs => matches!(self, Self::ConfigEditor | Self::Operator | Self::Admin),
            Permission::WriteRollouts => matches!(self, Self::RolloutOperator | Self::Operator | Self::Admin),
            Permission::ManageKeys => self == Self::Admin,
        }
    }
}

/// Which tenants a token acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every tenant (the one the request names).
    All,
    /// This tenant only.
    Tenant(TenantId),
}

/// One configured operator token.
#[derive(Clone, PartialEq, Eq)]
pub struct OperatorToken {
    /// Who this is, as the audit log names them.
    pub name: String,
    /// The secret the operator presents.
    pub token: String,
    /// What they may do.
    pub role: Role,
    /// Where.
    pub scope: Scope,
}

impl fmt::Debug for OperatorToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OperatorToken")
            .field("name", &self.name)
            .field("token", &"[REDACTED]")
            .field("role", &self.role)
            .field("scope", &self.scope)
            .finish()
    }
}

/// The operator behind a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    /// Token name (`anonymous` when the API is open).
    pub name: String,
    /// Role.
    pub role: Role,
    /// Scope.
    pub scope: Scope,
}

impl Operator {
    /// The operator of an API without tokens: loopback by default, open to
    /// whoever reaches it.
    pub fn anonymous() -> Self {
        Self {
            name: "anonymous".into(),
            role: Role::Admin,
            scope: Scope::All,
        }
    }

    /// The tenant a request acts on: the one it names, if the scope allows.
    pub fn tenant(&self, requested: Option<TenantId>) -> Result<TenantId, AccessError> {
        match (&self.scope, requested) {
            (Scope::All, requested) => Ok(requested.unwrap_or_else(TenantId::default_tenant)),
            (Scope::Tenant(own), None) => Ok(own.clone()),
            (Scope::Tenant(own), Some(requested)) if requested == *own => Ok(requested),
            (Scope::Tenant(_), Some(requested)) => Err(AccessError::OtherTenant(requested)),
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error("missing bearer token")]
    Missing,
    #[error("wrong admin token")]
    Wrong,
    #[error("this token may not act on tenant {0}")]
    OtherTenant(TenantId),
    #[error("role {role} may not {what}")]
    Forbidden { role: Role, what: &'static str },
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Finds the operator presenting `presented` among `tokens`, comparing every
/// token in constant time.
pub fn identify(tokens: &[OperatorToken], presented: Option<&str>) -> Result<Operator, AccessError> {
    if tokens.is_empty() {
        return Ok(Operator::anonymous());
    }
    let presented = presented.ok_or(AccessError::Missing)?;
    let mut found = None;
    for token in tokens {
        if constant_time_eq(presented.as_bytes(), token.token.as_bytes()) && found.is_none() {
            found = Some(token);
        }
    }
    let token = found.ok_or(AccessError::Wrong)?;
    Ok(Operator {
        name: token.name.clone(),
        role: token.role,
        scope: token.scope.clone(),
    })
}

/// What a request under `/api/v1` needs, from its method and path.
/// POST routes that change nothing (a diff), so reading is enough and they
/// are not audited as mutations.
pub fn is_read_only(path: &str) -> bool {
    let path = path.trim_start_matches("/api/v1");
    path.starts_with("/configs/") && path.ends_with("/diff")
}

pub fn required(method: &Method, path: &str) -> (Permission, &'static str) {
    let path = path.trim_start_matches("/api/v1");
    if path == "/keys" || path.starts_with("/keys/") {
        return (Permission::ManageKeys, "manage API keys");
    }
    if (path.starts_with("/agents/") && path.ends_with("/certificate")) || path == "/commands/certificate" {
        return (Permission::ManageKeys, "issue agent certificates");
    }
    if method == Method::GET || method == Method::HEAD || is_read_only(path) {
        return (Permission::Read, "read");
    }
    if path == "/rollouts" || path.starts_with("/rollouts/") {
        return (Permission::WriteRollouts, "start or command rollouts");
    }
    if path.starts_with("/commands/") || path.starts_with("/agents/") {
        return (Permission::WriteRollouts, "restart agents or send them messages");
    }
    (Permission::WriteConfigs, "change configs or assignments")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(name: &str, role: Role, scope: Scope) -> OperatorToken {
        OperatorToken {
            name: name.into(),
            token: format!("secret-{name}"),
            role,
            scope,
        }
    }

    #[test]
    fn roles_grant_what_the_table_says() {
        use Permission::*;
        let table = [
            (Role::Viewer, [true, false, false, false]),
            (Role::ConfigEditor, [true, true, false, false]),
            (Role::RolloutOperator, [true, false, true, false]),
            (Role::Operator, [true, true, true, false]),
            (Role::Admin, [true, true, true, true]),
        ];
        for (role, expected) in table {
            let got = [Read, WriteConfigs, WriteRollouts, ManageKeys].map(|p| role.allows(p));
            assert_eq!(got, expected, "{role:?}");
        }
    }

    #[test]
    fn requests_need_the_matching_permission() {
        assert_eq!(required(&Method::GET, "/api/v1/agents").0, Permission::Read);
        assert_eq!(
            required(&Method::POST, "/api/v1/configs/a/versions").0,
            Permission::WriteConfigs
        );
        assert_eq!(
            required(&Method::DELETE, "/api/v1/assignments/a").0,
            Permission::WriteConfigs
        );
        assert_eq!(required(&Method::POST, "/api/v1/rollouts").0, Permission::WriteRollouts);
        assert_eq!(
            required(&Method::POST, "/api/v1/rollouts/r/pause").0,
            Permission::WriteRollouts
        );
        assert_eq!(required(&Method::GET, "/api/v1/keys").0, Permission::ManageKeys);
    }

    #[test]
    fn tokens_identify_operators_and_scopes_hold() {
        let acme = TenantId::new("acme".to_owned()).unwrap();
        let tokens = [
            token("ops", Role::Operator, Scope::All),
            token("acme-viewer", Role::Viewer, Scope::Tenant(acme.clone())),
        ];
        assert_eq!(identify(&tokens, None), Err(AccessError::Missing));
        assert_eq!(identify(&tokens, Some("nope")), Err(AccessError::Wrong));
        let viewer = identify(&tokens, Some("secret-acme-viewer")).unwrap();
        assert_eq!(viewer.name, "acme-viewer");
        assert_eq!(viewer.tenant(None), Ok(acme.clone()));
        let globex = TenantId::new("globex".to_owned()).unwrap();
        assert_eq!(
            viewer.tenant(Some(globex.clone())),
            Err(AccessError::OtherTenant(globex.clone()))
        );
        let ops = identify(&tokens, Some("secret-ops")).unwrap();
        assert_eq!(ops.tenant(Some(globex.clone())), Ok(globex));
        assert!(!format!("{:?}", tokens[0]).contains("secret-ops"));
        assert_eq!(identify(&[], None).unwrap(), Operator::anonymous());
    }
}
