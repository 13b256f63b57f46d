//! The YAML configuration: any text is a `Config` or a `ConfigError` that names the file, never a
//! panic; a configuration that loads builds its layer (memory store).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::config::{Config, StoreConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, "fuzz.yaml") {
        Ok(config) => {
            if config.store == StoreConfig::Memory {
                // Everything `build` checks was checked by `parse`: it must not refuse.
                if let Err(e) = config.layer() {
                    panic!("a loaded configuration did not build: {e}\n{text}");
                }
            }
            assert!(config.needs_restart(&config).is_empty());
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.starts_with("fuzz.yaml"), "{message}");
            if let Some(line) = e.line {
                // Lines end at \n, \r\n or a lone \r, as YAML numbers them; an error may be at
                // the end of the input, one past the last line.
                let breaks = text.replace("\r\n", "\n").matches(['\n', '\r']).count();
                assert!(line >= 1 && line <= breaks + 2, "{message}");
            }
        }
    }
});
