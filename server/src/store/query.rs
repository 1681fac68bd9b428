//! The listing queries both SQL stores run, written once: each builder gives the SQL text for a
//! dialect and the values to bind, in order. Only the conditions a query uses are written, so
//! the planner sees plain equalities and ranges it can serve from the indexes the migrations
//! create (an `? IS NULL OR col = ?` filter would hide them).

use boundkey_auth::model::LockTarget;
use boundkey_auth::store::{AuditQuery, InstanceQuery, InstanceState, TokenQuery};
use boundkey_auth::UnixTime;

/// How a store spells its numbered placeholders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// `?1`, `?2`, …
    Sqlite,
    /// `$1`, `$2`, …
    Postgres,
}

/// A value to bind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Arg {
    Int(i64),
    Text(String),
}

/// SQL text and its arguments, built condition by condition.
///
/// Invariant: `sql` uses exactly the placeholders 1 to `args.len()`, the n-th for `args[n-1]`
/// (every placeholder is made by [`Query::bind`] as its value is pushed); no input is ever
/// written into `sql` itself.
#[derive(Debug)]
pub(crate) struct Query {
    dialect: Dialect,
    pub(crate) sql: String,
    pub(crate) args: Vec<Arg>,
    conditions: Vec<String>,
}

impl Query {
    fn new(dialect: Dialect, select: &str) -> Self {
        Query {
            dialect,
            sql: select.to_string(),
            args: Vec::new(),
            conditions: Vec::new(),
        }
    }

    /// Binds `arg` and returns its placeholder.
    fn bind(&mut self, arg: Arg) -> String {
        self.args.push(arg);
        match self.dialect {
            Dialect::Sqlite => format!("?{}", self.args.len()),
            Dialect::Postgres => format!("${}", self.args.len()),
        }
    }

    /// `column OP value`.
    fn cond(&mut self, column: &str, op: &str, arg: Arg) {
        let p = self.bind(arg);
        self.conditions.push(format!("{column} {op} {p}"));
    }

    /// Appends the WHERE clause, the order and the limit (none: every row).
    fn finish(mut self, order: &str, limit: Option<usize>) -> Self {
        if !self.conditions.is_empty() {
            self.sql.push_str(" WHERE ");
            self.sql.push_str(&self.conditions.join(" AND "));
        }
        self.sql.push_str(&format!(" ORDER BY {order}"));
        if let Some(limit) = limit {
            let p = self.bind(Arg::Int(to_i64(limit)));
            self.sql.push_str(&format!(" LIMIT {p}"));
        }
        self
    }
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn int(t: UnixTime) -> Arg {
    Arg::Int(t)
}

/// A page of instances. `columns` is the select list (the stores read the document
/// differently).
pub(crate) fn instances(dialect: Dialect, columns: &str, q: &InstanceQuery) -> Query {
    let mut query = Query::new(dialect, &format!("SELECT {columns} FROM instances"));
    if let Some(bot) = &q.bot {
        query.cond("bot_name", "=", Arg::Text(bot.clone()));
    }
    if let Some(c) = &q.after {
        let t = query.bind(int(c.created_at));
        let id = query.bind(Arg::Text(c.id.clone()));
        query
            .conditions
            .push(format!("(created_at, id) > ({t}, {id})"));
    }
    if let Some(t) = q.created_since {
        query.cond("created_at", ">=", int(t));
    }
    if let Some(t) = q.created_until {
        query.cond("created_at", "<", int(t));
    }
    // An instance is expired from the second its `expires` is reached (`BotInstance::is_expired`).
    match q.state {
        Some(InstanceState::Active) => query.cond("expires", ">", int(q.now)),
        Some(InstanceState::Expired) => query.cond("expires", "<=", int(q.now)),
        None => {}
    }
    query.finish("created_at, id", Some(q.limit))
}

/// A page of tokens.
pub(crate) fn tokens(dialect: Dialect, columns: &str, q: &TokenQuery) -> Query {
    let mut query = Query::new(dialect, &format!("SELECT {columns} FROM tokens"));
    if let Some(bot) = &q.bot {
        query.cond("bot_name", "=", Arg::Text(bot.clone()));
    }
    if let Some(after) = &q.after {
        query.cond("name", ">", Arg::Text(after.clone()));
    }
    query.finish("name", Some(q.limit))
}

/// Audit events, newest first. Without a limit every match is returned.
pub(crate) fn audit(dialect: Dialect, columns: &str, q: &AuditQuery) -> Query {
    let mut query = Query::new(dialect, &format!("SELECT {columns} FROM audit"));
    if let Some(kind) = &q.kind {
        query.cond("type", "=", Arg::Text(kind.clone()));
    }
    if let Some(bot) = &q.bot {
        query.cond("bot_name", "=", Arg::Text(bot.clone()));
    }
    if let Some(t) = q.since {
        query.cond("time", ">=", int(t));
    }
    if let Some(t) = q.until {
        query.cond("time", "<", int(t));
    }
    if let Some(id) = q.before {
        query.cond("id", "<", Arg::Int(i64::try_from(id).unwrap_or(i64::MAX)));
    }
    query.finish("id DESC", q.limit)
}

/// Locks on any of `targets` (looked up through the `(target_kind, target_value)` index).
pub(crate) fn locks_for(dialect: Dialect, columns: &str, targets: &[LockTarget]) -> Query {
    let mut query = Query::new(dialect, &format!("SELECT {columns} FROM locks"));
    let mut any = Vec::with_capacity(targets.len());
    for t in targets {
        let kind = query.bind(Arg::Text(t.kind().to_string()));
        let value = query.bind(Arg::Text(t.value().to_string()));
        any.push(format!("(target_kind = {kind} AND target_value = {value})"));
    }
    if any.is_empty() {
        any.push("FALSE".to_string());
    }
    query.conditions.push(format!("({})", any.join(" OR ")));
    query.finish("name", None)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use boundkey_auth::store::InstanceCursor;

    #[test]
    fn only_the_filters_given_are_written() {
        let q = instances(Dialect::Postgres, "id", &InstanceQuery::first(100, 5));
        assert_eq!(
            q.sql,
            "SELECT id FROM instances ORDER BY created_at, id LIMIT $1"
        );
        assert_eq!(q.args, [Arg::Int(100)]);
        let q = instances(
            Dialect::Sqlite,
            "id",
            &InstanceQuery {
                bot: Some("b".into()),
                state: Some(InstanceState::Expired),
                after: Some(InstanceCursor {
                    created_at: 7,
                    id: "i".into(),
                }),
                ..InstanceQuery::first(10, 5)
            },
        );
        assert_eq!(
            q.sql,
            "SELECT id FROM instances WHERE bot_name = ?1 AND (created_at, id) > (?2, ?3) \
             AND expires <= ?4 ORDER BY created_at, id LIMIT ?5"
        );
        assert_eq!(
            q.args,
            [
                Arg::Text("b".into()),
                Arg::Int(7),
                Arg::Text("i".into()),
                Arg::Int(5),
                Arg::Int(10)
            ]
        );
    }

    #[test]
    fn no_lock_target_matches_nothing() {
        let q = locks_for(Dialect::Sqlite, "doc", &[]);
        assert!(q.sql.contains("WHERE (FALSE)"), "{}", q.sql);
    }
}
