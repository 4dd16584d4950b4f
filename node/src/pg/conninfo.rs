//! libpq connection strings (`key=value` with libpq's quoting) and SQL string literals, for
//! the places that cannot take bind parameters (`primary_conninfo`, `ALTER SYSTEM`).

/// Quotes a libpq conninfo value: bare when it is non-empty and has no space, quote or
/// backslash; otherwise in single quotes with `'` and `\` backslash-escaped.
pub fn quote_conninfo_value(v: &str) -> String {
    let plain = !v.is_empty()
        && !v
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\' || c == '=');
    if plain {
        return v.to_string();
    }
    let mut out = String::with_capacity(v.len() + 2);
    out.push('\'');
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// Builds a libpq conninfo string from `(key, value)` pairs, in order.
pub fn conninfo<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    pairs
        .into_iter()
        .map(|(k, v)| format!("{k}={}", quote_conninfo_value(v)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A string value in a Postgres config file (`postgresql.conf`, `postgresql.auto.conf`):
/// single quotes, with `'` doubled and `\` doubled, since the config lexer reads backslash
/// escapes (as ALTER SYSTEM writes them).
pub fn quote_conf_value(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
}

/// A SQL string literal: single quotes, with `'` doubled. Standard-conforming strings are
/// on by default since PG 9.1, so backslashes need no escaping.
pub fn quote_literal(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_values_stay_bare() {
        assert_eq!(
            conninfo([
                ("host", "127.0.0.1"),
                ("port", "5432"),
                ("application_name", "s1")
            ]),
            "host=127.0.0.1 port=5432 application_name=s1"
        );
    }

    #[test]
    fn awkward_values_are_quoted_and_escaped() {
        assert_eq!(quote_conninfo_value(""), "''");
        assert_eq!(quote_conninfo_value("a b"), "'a b'");
        assert_eq!(quote_conninfo_value("it's"), r"'it\'s'");
        assert_eq!(quote_conninfo_value(r"back\slash"), r"'back\\slash'");
        assert_eq!(quote_conninfo_value("a=b"), "'a=b'");
        assert_eq!(conninfo([("password", "p w'd")]), r"password='p w\'d'");
    }

    #[test]
    fn conf_values_double_quotes_and_backslashes() {
        assert_eq!(quote_conf_value("ANY 1 (s1)"), "'ANY 1 (s1)'");
        assert_eq!(quote_conf_value(r"pw='a\'b'"), r"'pw=''a\\''b'''");
    }

    #[test]
    fn sql_literals_double_quotes() {
        assert_eq!(quote_literal("ANY 1 (s1)"), "'ANY 1 (s1)'");
        assert_eq!(quote_literal("o'brien"), "'o''brien'");
        assert_eq!(
            quote_literal(r"host=x password='a\'b'"),
            r"'host=x password=''a\''b'''"
        );
    }
}
