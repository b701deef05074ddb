//! Loading, defaults and the checks of each key.

use super::*;

fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_toml(text, Path::new("t.toml"), env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
}

#[test]
fn shipped_config_is_valid_and_matches_the_defaults() {
    let shipped = load(include_str!("../../config/fwgate.toml"), &[]).expect("config/fwgate.toml is valid");
    let defaults = toml::to_string(&Config::default()).unwrap();
    assert_eq!(toml::to_string(&shipped).unwrap(), defaults, "documented values drifted from the code's defaults");
}

#[test]
fn unknown_keys_are_reported_with_their_path() {
    let err = load("[mqtt]\nlisten = \"0.0.0.0:1883\"\nmax_conections = 5\n", &[]).unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("mqtt.max_conections:"), "{text}");
}

#[test]
fn wrong_types_and_bad_values_name_the_key() {
    assert!(load("[dfu]\nmax_block_size = \"big\"\n", &[]).unwrap_err().to_string().starts_with("dfu.max_block_size:"));
    assert!(load("[dfu]\nmax_block_size = 1\n", &[]).unwrap_err().to_string().starts_with("dfu.max_block_size:"));
    assert!(load("[mqtt]\nauth = true\n", &[]).unwrap_err().to_string().starts_with("mqtt.device_secret:"));
}

#[test]
fn external_mode_settings_are_checked() {
    let ext = |extra: &str| load(&format!("[mqtt]\nmode = \"external\"\n{extra}"), &[]);
    let c = ext("broker_url = \"mqtts://b.example\"\nbroker_ca = \"ca.pem\"\n").unwrap();
    assert_eq!((c.mqtt.mode, c.mqtt.broker().unwrap()), (MqttMode::External, ("b.example".into(), 8883, true)));
    for (extra, key) in [
        ("broker_url = \"http://b:1883\"", "mqtt.broker_url:"),
        ("share_group = \"a/b\"", "mqtt.share_group:"),
        ("share_group = \"\"", "mqtt.share_group:"),
        ("topic_prefix = \"t/#/\"", "mqtt.topic_prefix:"),
        ("topic_prefix = \"$SYS/\"", "mqtt.topic_prefix:"),
        ("broker_ca = \"ca.pem\"", "mqtt.broker_ca:"),
        ("broker_url = \"mqtts://b\"\nclient_cert = \"c.pem\"", "mqtt.client_cert:"),
    ] {
        let err = ext(extra).unwrap_err();
        assert!(err.to_string().starts_with(key), "{extra}: {err}");
    }
    let err = load("[mqtt]\nmode = \"cluster\"\n", &[]).unwrap_err();
    assert!(err.to_string().starts_with("mqtt.mode:"), "{err}");
    // The embedded listener ignores the external keys.
    assert!(load("[mqtt]\nshare_group = \"a/b\"\n", &[]).is_ok());
}

#[test]
fn env_overrides_win_and_are_checked() {
    let c = load(
        "[dfu]\nmax_block_size = 512\n",
        &[("FWGATE_DFU__MAX_BLOCK_SIZE", "1024"), ("FWGATE_STORE__DATA_DIR", "/tmp/x")],
    )
    .unwrap();
    assert_eq!(c.dfu.max_block_size, 1024);
    assert_eq!(c.store.data_dir, PathBuf::from("/tmp/x"));
    // CLI variables are not config keys.
    assert!(load("", &[("FWGATE_SERVER", "http://x"), ("FWGATE_TOKEN", "t")]).is_ok());
    let err = load("", &[("FWGATE_TUF__CI_ROOT", "/etc/ci-root.json")]).unwrap_err();
    assert!(err.to_string().starts_with("tuf.ci_metadata_url:"), "{err}");
    // A string key stays a string whatever it looks like; a number key is still a number.
    let c = load("", &[("FWGATE_MQTT__PASSWORD", "12345"), ("FWGATE_ADMIN__TOKEN", "true")]).unwrap();
    assert_eq!((c.mqtt.password.as_str(), c.admin.token.as_str()), ("12345", "true"));
    let err = load("", &[("FWGATE_DFU__MAX_WINDOW", "many")]).unwrap_err();
    assert!(err.to_string().starts_with("dfu.max_window:"), "{err}");
    let err = load("", &[("FWGATE_DFU__NOPE", "1")]).unwrap_err();
    assert!(err.to_string().starts_with("dfu.nope:"), "{err}");
}
