//! The command-line conventions of the example binaries, shared by including this file
//! (`#[path = "../../shared/cli.rs"] mod cli;`): clap parses, `--help` and `--version` print to
//! stdout and exit 0, and a mistake is **one** line on stderr that names it.

use std::process::ExitCode;

/// Parses the process's arguments into `T`.
///
/// `--help` and `--version` print to stdout and give `Err(ExitCode::SUCCESS)`. A bad flag or
/// value prints `NAME: PROBLEM (see NAME --help)` to stderr, one line, and gives clap's
/// usage-error code (2): the caller returns the code from `main`.
pub(crate) fn parse<T: clap::Parser>() -> Result<T, ExitCode> {
    T::try_parse().map_err(|e| {
        if e.use_stderr() {
            eprintln!("{}", one_line(T::command().get_name(), &e));
        } else {
            // The help or the version, on stdout; nothing to do if stdout is gone.
            let _ = e.print();
        }
        ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
    })
}

/// The error line: clap's message without its `error: ` prefix, the lines of its first paragraph
/// joined (a missing argument is named on the line after the message), then where to read more.
/// clap's usage and tips, a paragraph each, are left out.
fn one_line(name: &str, e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let problem: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .take_while(|line| !line.is_empty())
        .collect();
    let problem = problem.join(" ");
    let problem = problem.strip_prefix("error: ").unwrap_or(&problem);
    format!("{name}: {problem} (see {name} --help)")
}

#[cfg(test)]
mod tests {
    use super::one_line;
    use clap::Parser;

    /// A command line with one required and one checked flag.
    #[derive(Debug, Parser)]
    #[command(name = "demo")]
    struct Demo {
        /// Where.
        #[arg(long)]
        url: String,
        /// How many.
        #[arg(long, default_value_t = 1)]
        n: u32,
    }

    fn error(args: &[&str]) -> String {
        let e = Demo::try_parse_from(args).expect_err("a mistake");
        one_line("demo", &e)
    }

    #[test]
    fn one_line_names_the_problem() {
        let line = error(&["demo", "--url", "u", "--n", "many"]);
        assert_eq!(
            line,
            "demo: invalid value 'many' for '--n <N>': invalid digit found in string \
             (see demo --help)"
        );
        let line = error(&["demo"]);
        assert!(
            line.starts_with("demo: the following required arguments were not provided: --url"),
            "{line}"
        );
        let line = error(&["demo", "--url", "u", "--nope"]);
        assert!(
            line.starts_with("demo: unexpected argument '--nope' found ("),
            "{line}"
        );
        for line in [line, error(&["demo", "--url"])] {
            assert!(!line.contains('\n'), "{line:?}");
        }
    }
}
