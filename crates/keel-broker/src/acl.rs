//! Access control, pure: allow rules (stored in `__meta`, so every node decides from its own
//! applied copy), the resource and operation each RPC needs, and the decision. Denial is the
//! default once authentication is on; superusers and nodes pass every check.

use serde::{Deserialize, Serialize};

use crate::metadata::MetaError;

/// Most rules the cluster keeps: each is a few hundred bytes of every node's metadata.
pub const ACL_RULES_MAX: usize = 10_000;
/// Longest principal name or resource name in a rule.
pub const ACL_NAME_BYTES_MAX: usize = 255;

/// What a rule is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceType {
    /// A topic.
    Topic,
    /// A consumer group.
    Group,
    /// The cluster (its nodes, its ACLs).
    Cluster,
}

/// What a rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// Write records to a topic (delayed ones too, and cancel them).
    Produce,
    /// Read a topic's records (fetch, subscribe, audit).
    Consume,
    /// See a topic or group exists and describe it.
    Describe,
    /// Create a topic.
    Create,
    /// Delete a topic or a group (and reset a group's offsets).
    Delete,
    /// Change a topic (add partitions).
    Alter,
    /// Be a member of a group: heartbeat, commit, nack, replay its dead letters.
    Join,
    /// Administer the cluster: manage ACLs.
    Admin,
}

impl Operation {
    /// Every operation, for listing and parsing.
    pub const ALL: [Operation; 8] = [
        Operation::Produce,
        Operation::Consume,
        Operation::Describe,
        Operation::Create,
        Operation::Delete,
        Operation::Alter,
        Operation::Join,
        Operation::Admin,
    ];

    /// Its lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Operation::Produce => "produce",
            Operation::Consume => "consume",
            Operation::Describe => "describe",
            Operation::Create => "create",
            Operation::Delete => "delete",
            Operation::Alter => "alter",
            Operation::Join => "join",
            Operation::Admin => "admin",
        }
    }

    /// Parses a lower-case name.
    pub fn parse(name: &str) -> Option<Operation> {
        Operation::ALL.into_iter().find(|o| o.name() == name)
    }
}

/// One allow rule: `principal` (`User:NAME`, or `*` for every authenticated principal) may do
/// `operation` on resources of `resource_type` named `name` (or starting with it, `prefix`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AclRule {
    /// `User:NAME` or `*`.
    pub principal: String,
    /// Topic, group or cluster.
    pub resource_type: ResourceType,
    /// The resource's name, or its prefix; ignored (empty) for the cluster.
    pub name: String,
    /// `name` is a prefix.
    pub prefix: bool,
    /// What it allows.
    pub operation: Operation,
}

impl AclRule {
    /// Checks the rule is well formed.
    pub fn validate(&self) -> Result<(), MetaError> {
        let principal_ok = self.principal == "*"
            || self.principal.strip_prefix("User:").is_some_and(|n| !n.is_empty() && n.len() <= ACL_NAME_BYTES_MAX);
        if !principal_ok {
            return Err(MetaError::Invalid(format!(
                "principal {:?}: User:NAME (1 to {ACL_NAME_BYTES_MAX} bytes) or *",
                self.principal
            )));
        }
        if self.name.len() > ACL_NAME_BYTES_MAX {
            return Err(MetaError::Invalid(format!("resource names are at most {ACL_NAME_BYTES_MAX} bytes")));
        }
        match self.resource_type {
            ResourceType::Cluster if !self.name.is_empty() || self.prefix => {
                Err(MetaError::Invalid("a cluster rule names no resource".into()))
            }
            ResourceType::Cluster if !matches!(self.operation, Operation::Admin | Operation::Describe) => {
                Err(MetaError::Invalid("the cluster's operations are admin and describe".into()))
            }
            ResourceType::Topic | ResourceType::Group if self.name.is_empty() && !self.prefix => {
                Err(MetaError::Invalid("name the topic or group (or give a prefix; an empty prefix is all)".into()))
            }
            ResourceType::Topic if matches!(self.operation, Operation::Join | Operation::Admin) => {
                Err(MetaError::Invalid(format!("{} is not a topic operation", self.operation.name())))
            }
            ResourceType::Group
                if !matches!(self.operation, Operation::Join | Operation::Describe | Operation::Delete) =>
            {
                Err(MetaError::Invalid(format!("{} is not a group operation", self.operation.name())))
            }
            _ => Ok(()),
        }
    }

    /// Whether the rule allows `principal` to do `operation` on `resource`. Any operation on a
    /// resource implies describing it (a producer may look its topic up, a member its group's
    /// offsets), and admin on the cluster implies describing it.
    pub fn allows(&self, principal: &str, resource: &Resource<'_>, operation: Operation) -> bool {
        let covers = self.operation == operation || operation == Operation::Describe;
        if !covers || (self.principal != "*" && self.principal != principal) {
            return false;
        }
        let (kind, name) = match resource {
            Resource::Topic(n) => (ResourceType::Topic, *n),
            Resource::Group(n) => (ResourceType::Group, *n),
            Resource::Cluster => (ResourceType::Cluster, ""),
        };
        kind == self.resource_type && if self.prefix { name.starts_with(&self.name) } else { name == self.name }
    }
}

/// What a request acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource<'a> {
    /// A topic, by name.
    Topic(&'a str),
    /// A group, by name.
    Group(&'a str),
    /// The cluster.
    Cluster,
}

impl std::fmt::Display for Resource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resource::Topic(n) => write!(f, "topic {n:?}"),
            Resource::Group(n) => write!(f, "group {n:?}"),
            Resource::Cluster => f.write_str("the cluster"),
        }
    }
}

/// Whether any of `rules` allows `principal` (`User:NAME`) to do `operation` on `resource`.
pub fn allowed<'r>(
    rules: impl IntoIterator<Item = &'r AclRule>,
    principal: &str,
    resource: &Resource<'_>,
    operation: Operation,
) -> bool {
    rules.into_iter().any(|r| r.allows(principal, resource, operation))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(principal: &str, kind: ResourceType, name: &str, prefix: bool, op: Operation) -> AclRule {
        AclRule { principal: principal.into(), resource_type: kind, name: name.into(), prefix, operation: op }
    }

    #[test]
    fn a_rule_allows_what_it_names_and_nothing_else() {
        let rules = [
            rule("User:alice", ResourceType::Topic, "orders", false, Operation::Produce),
            rule("*", ResourceType::Topic, "public.", true, Operation::Consume),
            rule("User:ops", ResourceType::Cluster, "", false, Operation::Admin),
        ];
        let can = |p: &str, r: Resource<'_>, o| allowed(&rules, p, &r, o);
        assert!(can("User:alice", Resource::Topic("orders"), Operation::Produce));
        assert!(!can("User:alice", Resource::Topic("orders"), Operation::Consume));
        assert!(!can("User:alice", Resource::Topic("orders2"), Operation::Produce), "literal, not prefix");
        assert!(!can("User:bob", Resource::Topic("orders"), Operation::Produce));
        assert!(can("User:bob", Resource::Topic("public.news"), Operation::Consume));
        assert!(!can("User:bob", Resource::Group("public.news"), Operation::Consume), "a topic rule is no group rule");
        assert!(can("User:ops", Resource::Cluster, Operation::Admin));
        assert!(!can("User:alice", Resource::Cluster, Operation::Admin));
        assert!(can("User:alice", Resource::Topic("orders"), Operation::Describe), "produce implies describe");
        assert!(!can("User:alice", Resource::Topic("other"), Operation::Describe));
    }

    #[test]
    fn malformed_rules_are_refused() {
        let bad = [
            rule("alice", ResourceType::Topic, "t", false, Operation::Produce),
            rule("User:", ResourceType::Topic, "t", false, Operation::Produce),
            rule("User:a", ResourceType::Topic, "", false, Operation::Produce),
            rule("User:a", ResourceType::Topic, "t", false, Operation::Join),
            rule("User:a", ResourceType::Group, "g", false, Operation::Produce),
            rule("User:a", ResourceType::Cluster, "x", false, Operation::Admin),
            rule("User:a", ResourceType::Cluster, "", false, Operation::Produce),
            rule("User:a", ResourceType::Group, "g", false, Operation::Admin),
            rule("User:a", ResourceType::Topic, &"n".repeat(ACL_NAME_BYTES_MAX + 1), false, Operation::Produce),
        ];
        for r in bad {
            assert!(r.validate().is_err(), "{r:?}");
        }
        assert!(rule("*", ResourceType::Topic, "", true, Operation::Describe).validate().is_ok(), "every topic");
    }
}
