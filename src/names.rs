//! Names of queues, topics and policies: `^[a-z0-9][a-z0-9_.:-]{0,127}$`.
//! They are passed to SQL as parameters only, but a strict alphabet keeps them safe in Redis
//! keys, NOTIFY payloads and log lines too.

pub const MAX_NAME_LEN: usize = 128;

/// Why a name was refused, in words a user can act on.
#[derive(Debug, PartialEq, Eq)]
pub enum NameProblem {
    Empty,
    TooLong(usize),
    BadFirst(char),
    BadChar(char),
}

impl std::fmt::Display for NameProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NameProblem::Empty => write!(f, "it is empty"),
            NameProblem::TooLong(n) => {
                write!(f, "it is {n} characters long, the limit is {MAX_NAME_LEN}")
            }
            NameProblem::BadFirst(c) => {
                write!(
                    f,
                    "it starts with {c:?}; the first character must be a-z or 0-9"
                )
            }
            NameProblem::BadChar(c) => write!(f, "it contains {c:?}"),
        }
    }
}

pub fn check(name: &str) -> Result<(), NameProblem> {
    let mut chars = name.chars();
    let first = chars.next().ok_or(NameProblem::Empty)?;
    let len = name.chars().count();
    if len > MAX_NAME_LEN {
        return Err(NameProblem::TooLong(len));
    }
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err(NameProblem::BadFirst(first));
    }
    match chars.find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "_.:-".contains(*c))) {
        Some(c) => Err(NameProblem::BadChar(c)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in [
            "a",
            "0",
            "emails",
            "tenant-1.emails:high_prio",
            &"a".repeat(128),
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_everything_else_with_a_reason() {
        assert_eq!(check(""), Err(NameProblem::Empty));
        assert_eq!(check(&"a".repeat(129)), Err(NameProblem::TooLong(129)));
        assert_eq!(check("_x"), Err(NameProblem::BadFirst('_')));
        assert_eq!(check("Emails"), Err(NameProblem::BadFirst('E')));
        assert_eq!(check("a b"), Err(NameProblem::BadChar(' ')));
        assert_eq!(check("a'; drop table x"), Err(NameProblem::BadChar('\'')));
        assert_eq!(check("é"), Err(NameProblem::BadFirst('é')));
        assert_eq!(check("aé"), Err(NameProblem::BadChar('é')));
    }
}
