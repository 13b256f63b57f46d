//! Every configuration error names where the configuration came from, including the errors
//! found after loading (building the layer or the limiter): the file given to `Config::load`,
//! the name given to `Config::parse`, or `(inline config)`; never an empty name.

use std::path::{Path, PathBuf};

use tollgate::config::{Config, StoreConfig};

const TIERS: &str = "rate_limits:\n  anonymous: { requests_per_minute: 10, burst_limit: 5 }\n";
const LIMITS: &str = "limits:\n  slack: { requests_per_second: 1, burst_limit: 20 }\n";

/// A file in a directory of its own, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> TempFile {
        let dir = std::env::temp_dir().join(format!(
            "tollgate-config-source-{}-{name}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write the temp file");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[test]
fn a_loaded_file_names_itself_after_loading() {
    let file = TempFile::new("limits-only.yaml", LIMITS);
    let config = Config::load(&file.0).expect("loads");
    assert_eq!(config.source(), file.0.as_path());
    let e = config.layer().expect_err("no tiers, no inbound layer");
    assert_eq!(e.file, file.0);
    assert_eq!(e.field.as_deref(), Some("rate_limits"));
    assert_eq!(
        e.to_string(),
        format!(
            "{}: rate_limits: the configuration has no tiers for the inbound layer",
            file.0.display()
        )
    );

    let file = TempFile::new("tiers-only.yaml", TIERS);
    let e = Config::load(&file.0)
        .expect("loads")
        .limiter()
        .expect_err("no limits, no limiter");
    assert_eq!(e.file, file.0);
    assert!(
        e.to_string()
            .starts_with(&format!("{}: limits: ", file.0.display())),
        "{e}"
    );
}

#[test]
fn parsed_text_names_its_name_or_says_it_is_inline() {
    let config = Config::parse(LIMITS, "from-the-vault").expect("parses");
    assert_eq!(config.source(), Path::new("from-the-vault"));
    let e = config.layer().expect_err("no tiers");
    assert_eq!(e.file, Path::new("from-the-vault"));

    // No name: `(inline config)`, for errors while parsing and after.
    for config in [
        Config::parse(LIMITS, "").expect("parses"),
        LIMITS.parse::<Config>().expect("parses"),
    ] {
        assert_eq!(config.source(), Path::new("(inline config)"));
        let e = config.layer().expect_err("no tiers");
        assert_eq!(e.file, Path::new("(inline config)"));
        assert!(
            e.to_string().starts_with("(inline config): rate_limits: "),
            "{e}"
        );
    }
    let e = "rate_limits: 3\n"
        .parse::<Config>()
        .expect_err("not a mapping");
    assert!(e.to_string().starts_with("(inline config):1: "), "{e}");
    let e = Config::parse("headers: loud\n", "").expect_err("bad");
    assert_eq!(e.file, Path::new("(inline config)"));
}

#[tokio::test]
async fn a_store_the_file_gives_is_blamed_on_its_line() {
    let text = format!("{TIERS}store:\n  redis: {{ url: \"notaurl\" }}\n");
    let config = Config::parse(&text, "limits.yaml").expect("the URL is checked when built");
    let e = config.layer().expect_err("a bad URL");
    assert_eq!(
        e.to_string(),
        "limits.yaml:4: store.redis: invalid redis url `notaurl`"
    );
    let text = format!("{LIMITS}store:\n  redis: {{ url: \"notaurl\" }}\n");
    let e = Config::parse(&text, "limits.yaml")
        .expect("parses")
        .limiter()
        .expect_err("a bad URL");
    assert_eq!(
        e.to_string(),
        "limits.yaml:4: store.redis: invalid redis url `notaurl`"
    );
}

#[tokio::test]
async fn a_store_set_after_loading_is_not_blamed_on_the_file() {
    let mut config = Config::parse(TIERS, "limits.yaml").expect("parses");
    config.store = StoreConfig::Redis {
        url: "notaurl".to_owned(),
        prefix: "tollgate".to_owned(),
    };
    let e = config.layer().expect_err("a bad URL");
    assert_eq!(e.file, Path::new("limits.yaml"));
    assert_eq!(e.line, None, "{e}");
    assert_eq!(
        e.to_string(),
        "limits.yaml: store.redis: invalid redis url `notaurl` (in a store set after loading; \
         the file's store is memory)"
    );
}
