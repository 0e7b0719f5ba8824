//! Chat templates and chat label masks against transformers
//! (tests/fixtures/data/chat_reference.json, written by scripts/fixtures/data_reference.py):
//! renderings equal `apply_chat_template(tokenize=False)`, and labels equal
//! `return_assistant_tokens_mask` on `{% generation %}`-tagged copies of the templates.

use ferrotune::data::chat_template::CHATML;
use ferrotune::data::formats::Formatter;
use ferrotune::data::{
    ChatTemplate, ChatTemplateChoice, DataOptions, DatasetSpec, DatasetType, Message, SpecialTokens, TemplateVars,
    Tokenizer, TrainOnEos,
};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::OnceLock;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixtures().join("data/chat_reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Loading a tokenizer parses 1.6 MB of JSON; do it once per test binary.
fn tokenizer(name: &str) -> Tokenizer {
    static SMOL: OnceLock<Tokenizer> = OnceLock::new();
    static MISTRAL: OnceLock<Tokenizer> = OnceLock::new();
    let cell = if name == "smollm2" { &SMOL } else { &MISTRAL };
    cell.get_or_init(|| Tokenizer::from_dir(&fixtures().join("tokenizers").join(name)).unwrap())
        .clone()
}

#[test]
fn renderings_match_transformers() {
    let r = reference();
    let smol = tokenizer("smollm2");
    let mistral = tokenizer("mistral7b");
    let mut errors = 0;
    for case in r["renders"].as_array().unwrap() {
        let tname = case["template"].as_str().unwrap();
        let cname = case["conversation"].as_str().unwrap();
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let tok = if tname == "mistral_inst" { &mistral } else { &smol };
        let template = ChatTemplate::new(r["templates"][tname].as_str().unwrap()).unwrap();
        let messages = r["conversations"][cname].as_array().unwrap();
        let got = template.render_json(messages, agp, &TemplateVars::from_tokenizer(tok));
        match (&case["rendered"], &case["error"]) {
            (Value::String(want), _) => assert_eq!(&got.unwrap(), want, "{tname} / {cname} / agp={agp}"),
            (_, Value::String(msg)) => {
                let err = got.unwrap_err().to_string();
                assert_eq!(
                    err,
                    format!("chat template raised an exception: {msg}"),
                    "{tname} / {cname}"
                );
                errors += 1;
            }
            _ => panic!("bad fixture case {case}"),
        }
    }
    assert_eq!(
        errors, 4,
        "the mistral template raises on two conversations, with and without the prompt"
    );
}

#[test]
fn builtin_chatml_is_the_reference_chatml() {
    let r = reference();
    let vars = TemplateVars::default();
    let ours = ChatTemplate::new(CHATML).unwrap();
    let theirs = ChatTemplate::new(r["templates"]["chatml"].as_str().unwrap()).unwrap();
    let msgs = [
        Message::new("system", "s"),
        Message::new("user", "u"),
        Message::new("assistant", "a"),
    ];
    for agp in [false, true] {
        assert_eq!(
            ours.render(&msgs, agp, &vars).unwrap(),
            theirs.render(&msgs, agp, &vars).unwrap()
        );
    }
}

fn spec_for(case: &Value, templates: &Value) -> DatasetSpec {
    let tname = case["template"].as_str().unwrap();
    let mut spec = DatasetSpec::new("unused.jsonl", DatasetType::ChatTemplate);
    match tname {
        "smollm2" => spec.chat_template = Some(ChatTemplateChoice::TokenizerDefault),
        "chatml" => spec.chat_template = Some(ChatTemplateChoice::Chatml),
        _ => {
            spec.chat_template = Some(ChatTemplateChoice::Jinja);
            spec.chat_template_jinja = Some(templates[tname].as_str().unwrap().to_string());
        }
    }
    spec.roles_to_train = Some(
        case["roles_to_train"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect(),
    );
    spec.train_on_eos = Some(serde_json::from_value::<TrainOnEos>(case["train_on_eos"].clone()).unwrap());
    spec
}

fn setup_tokenizer(setup: &Value) -> Tokenizer {
    let mut tok = tokenizer("smollm2");
    if let Some(added) = setup["added_token_ids"].as_object() {
        let mut by_id: Vec<(&String, u64)> = added.iter().map(|(k, v)| (k, v.as_u64().unwrap())).collect();
        by_id.sort_by_key(|&(_, id)| id);
        let names: Vec<&str> = by_id.iter().map(|(k, _)| k.as_str()).collect();
        tok.add_special_tokens(&names).unwrap();
        for (name, id) in by_id {
            assert_eq!(tok.token_to_id(name), Some(id as u32));
        }
    }
    let overrides = SpecialTokens {
        eos_token: setup["eos_token"].as_str().map(str::to_string),
        bos_token: setup["bos_token"].as_str().map(str::to_string),
        ..Default::default()
    };
    tok.set_special_tokens(&overrides).unwrap();
    tok
}

#[test]
fn label_masks_match_transformers_assistant_masks() {
    let r = reference();
    let cases = r["masks"].as_array().unwrap();
    assert_eq!(cases.len(), 84);
    for case in cases {
        let tok = setup_tokenizer(&case["tokenizer_setup"]);
        let spec = spec_for(case, &r["templates"]);
        let opts = DataOptions {
            train_on_inputs: case["train_on_inputs"].as_bool().unwrap(),
            ..Default::default()
        };
        let fmt = Formatter::new(&spec, &opts, &tok).unwrap();
        let cname = case["conversation"].as_str().unwrap();
        let row = json!({"messages": r["conversations"][cname]});
        let samples = fmt.format_row(&tok, row.as_object().unwrap()).unwrap();
        assert_eq!(samples.len(), 1);
        let want_ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let want_labels: Vec<i32> = serde_json::from_value(case["labels"].clone()).unwrap();
        let what = format!(
            "{} / {cname} / roles {} / train_on_eos {} / train_on_inputs {}",
            case["template"], case["roles_to_train"], case["train_on_eos"], case["train_on_inputs"]
        );
        assert_eq!(samples[0].input_ids, want_ids, "{what}");
        assert_eq!(samples[0].labels, want_labels, "{what}");
    }
}

#[test]
fn default_mask_trains_assistant_content_and_im_end_only() {
    // A direct look at one case: every trained token is inside an assistant turn or is the
    // <|im_end|> closing it; the newline after <|im_end|> and the headers are not trained.
    let tok = tokenizer("smollm2");
    let spec = DatasetSpec::new("x", DatasetType::ChatTemplate);
    let fmt = Formatter::new(&spec, &DataOptions::default(), &tok).unwrap();
    let row = json!({"messages": [
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "And 1 + 1?"},
        {"role": "assistant", "content": "2"}
    ]});
    let s = &fmt.format_row(&tok, row.as_object().unwrap()).unwrap()[0];
    let trained: Vec<String> = s
        .labels
        .iter()
        .filter(|&&l| l >= 0)
        .map(|&l| tok.id_to_token(l as u32).unwrap())
        .collect();
    assert_eq!(trained, ["4", "2", "<|im_end|>", "2", "<|im_end|>"]);
}

#[test]
fn message_property_mappings_rename_sharegpt_keys() {
    let tok = tokenizer("smollm2");
    let mut spec = DatasetSpec::new("x", DatasetType::ChatTemplate);
    spec.field_messages = Some("conversations".into());
    spec.message_property_mappings = Some(
        [
            ("role".to_string(), "from".to_string()),
            ("content".to_string(), "value".to_string()),
        ]
        .into(),
    );
    spec.roles_to_train = Some(vec!["gpt".into()]);
    spec.chat_template = Some(ChatTemplateChoice::Chatml);
    let fmt = Formatter::new(&spec, &DataOptions::default(), &tok).unwrap();
    let row = json!({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]});
    let s = &fmt.format_row(&tok, row.as_object().unwrap()).unwrap()[0];
    let text = tok.decode(&s.input_ids, false).unwrap();
    assert_eq!(text, "<|im_start|>human\nhi<|im_end|>\n<|im_start|>gpt\nyo<|im_end|>\n");
    let trained: Vec<u32> = s.labels.iter().filter(|&&l| l >= 0).map(|&l| l as u32).collect();
    assert_eq!(tok.decode(&trained, false).unwrap(), "yo<|im_end|>");

    // Without the mapping the error says which key is missing and how to map it.
    spec.message_property_mappings = None;
    let fmt = Formatter::new(&spec, &DataOptions::default(), &tok).unwrap();
    let err = fmt.format_row(&tok, row.as_object().unwrap()).unwrap_err().to_string();
    assert!(
        err.contains("conversations[0] has no `role`") && err.contains("`from`, `value`"),
        "{err}"
    );
    assert!(err.contains("message_property_mappings"), "{err}");
}

#[test]
fn a_template_that_raises_is_reported_with_its_message() {
    let tok = tokenizer("smollm2");
    let mut spec = DatasetSpec::new("x", DatasetType::ChatTemplate);
    spec.chat_template = Some(ChatTemplateChoice::Jinja);
    spec.chat_template_jinja = Some(
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('tool messages are not supported') }}\
         {% endif %}{{ m['content'] }}{% endfor %}"
            .into(),
    );
    let fmt = Formatter::new(&spec, &DataOptions::default(), &tok).unwrap();
    let row = json!({"messages": [{"role": "tool", "content": "{}"}]});
    let err = fmt.format_row(&tok, row.as_object().unwrap()).unwrap_err().to_string();
    assert_eq!(
        err,
        "chat template raised an exception: tool messages are not supported"
    );
}

#[test]
fn eot_tokens_mark_turn_ends_besides_eos() {
    // The Llama-3 reference masks were made with eos_token = <|eot_id|>; keeping SmolLM2's eos
    // and naming <|eot_id|> in eot_tokens must give the same labels.
    let r = reference();
    let case = r["masks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["template"] == "llama3_gen" && c["conversation"] == "multi" && c["train_on_eos"] == "turn")
        .unwrap();
    let mut setup = case["tokenizer_setup"].clone();
    setup.as_object_mut().unwrap().remove("eos_token");
    let tok = setup_tokenizer(&setup);
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    let spec = spec_for(case, &r["templates"]);
    let row = json!({"messages": r["conversations"]["multi"]});
    let want: Vec<i32> = serde_json::from_value(case["labels"].clone()).unwrap();

    let plain = Formatter::new(&spec, &DataOptions::default(), &tok).unwrap();
    let without = &plain.format_row(&tok, row.as_object().unwrap()).unwrap()[0];
    assert_ne!(
        without.labels, want,
        "without eot_tokens the <|eot_id|> tokens are not trained"
    );

    let opts = DataOptions {
        eot_tokens: Some(vec!["<|eot_id|>".into()]),
        ..Default::default()
    };
    let with = Formatter::new(&spec, &opts, &tok).unwrap();
    assert_eq!(with.format_row(&tok, row.as_object().unwrap()).unwrap()[0].labels, want);

    let bad = DataOptions {
        eot_tokens: Some(vec!["<|nope|>".into()]),
        ..Default::default()
    };
    let err = Formatter::new(&spec, &bad, &tok).unwrap_err().to_string();
    assert!(err.contains("eot_tokens") && err.contains("<|nope|>"), "{err}");
}
