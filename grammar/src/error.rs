//! pest's errors -> readable [`Diagnostic`]s: "expected one of: `conv(..)`, `bn`, ..., found `foo`",
//! with the offending token underlined.
//!
//! pest reports the named rules it tried at the furthest position it reached (`positives`);
//! with error detail on it also reports the literal tokens tried there (punctuation such as
//! `)` or `,`, which are not rules). Both are merged, named for people (see [`describe`]),
//! de-duplicated and listed in a fixed order, so messages are deterministic.

use pest::error::{Error, ErrorVariant, InputLocation};
use wrnc_compiler::Span;

use crate::parser::Rule;
use crate::{Diagnostic, Source};

/// How a rule is named in "expected ..." lists; `None` for rules never worth naming.
pub(crate) fn describe(r: Rule) -> Option<&'static str> {
    use Rule::*;
    Some(match r {
        EOI => "end of file",
        family | bare_family => "a family expression such as `WRN-28-10`",
        family_name => "a family name",
        fam_word => "a number",
        kernel_list => "`B(..)`",
        fam_dataset => "a dataset name",
        number | digits => "a number",
        name => "a name",
        boolean => "`true` or `false`",
        string | string_inner => "a quoted name",
        structural => "`{`",
        shape3 => "a shape such as `3x32x32`",
        kernel => "a kernel size such as `3x3`",
        network_item | kw_network => "`network`",
        train_block | kw_train => "`train`",
        dataset_item | kw_dataset => "`dataset`",
        dropout_item | kw_dropout => "`dropout`",
        shortcut_item | shortcut_sec | kw_shortcut => "`shortcut`",
        sd_item | kw_stochastic_depth => "`stochastic_depth`",
        classes_item | classes_decl | kw_classes => "`classes`",
        batch_item | kw_batch => "`batch`",
        precision_item | kw_precision => "`precision`",
        seed_item | kw_seed => "`seed`",
        epochs_item | kw_epochs => "`epochs`",
        lr_item | kw_lr => "`lr`",
        schedule_item | kw_schedule => "`schedule`",
        momentum_item | kw_momentum => "`momentum`",
        nesterov_item | kw_nesterov => "`nesterov`",
        wd_item | kw_weight_decay => "`weight_decay`",
        ls_item | kw_label_smoothing => "`label_smoothing`",
        step_schedule | kw_step => "`step(..)`",
        kw_gamma => "`gamma`",
        cosine => "`cosine`",
        onecycle => "`onecycle`",
        input_decl | kw_input => "`input`",
        conv | kw_conv => "`conv(..)`",
        bn => "`bn`",
        relu => "`relu`",
        dropout => "`dropout(..)`",
        maxpool | kw_maxpool => "`maxpool(..)`",
        avgpool | kw_avgpool => "`avgpool(..)`",
        gap => "`gap`",
        fc | kw_fc => "`fc`",
        residual | kw_residual => "`residual { .. }`",
        dense | kw_dense => "`dense { .. }`",
        repeat | kw_repeat => "`repeat N { .. }`",
        stride_opt | kw_stride => "`stride=`",
        pad_opt | kw_pad => "`pad=`",
        groups_opt | kw_groups => "`groups=`",
        bias_flag => "`bias`",
        pre_sec | kw_pre => "`pre`",
        body_sec | kw_body => "`body`",
        post_sec | kw_post => "`post`",
        survival_sec | kw_survival => "`survival`",
        _ => return None,
    })
}

/// The construct a keyword rule starts, so that `kw_conv` sorts with `conv`: expected sets are
/// listed in grammar order of the constructs.
fn rank(r: Rule) -> Rule {
    use Rule::*;
    match r {
        kw_network => network_item,
        kw_train => train_block,
        kw_dataset => dataset_item,
        kw_dropout => dropout_item,
        kw_shortcut => shortcut_item,
        kw_stochastic_depth => sd_item,
        kw_classes => classes_item,
        kw_batch => batch_item,
        kw_precision => precision_item,
        kw_seed => seed_item,
        kw_epochs => epochs_item,
        kw_lr => lr_item,
        kw_schedule => schedule_item,
        kw_momentum => momentum_item,
        kw_nesterov => nesterov_item,
        kw_weight_decay => wd_item,
        kw_label_smoothing => ls_item,
        kw_step => step_schedule,
        kw_input => input_decl,
        kw_conv => conv,
        kw_maxpool => maxpool,
        kw_avgpool => avgpool,
        kw_fc => fc,
        kw_residual => residual,
        kw_dense => dense,
        kw_repeat => repeat,
        kw_stride => stride_opt,
        kw_pad => pad_opt,
        kw_groups => groups_opt,
        kw_pre => pre_sec,
        kw_body => body_sec,
        kw_post => post_sec,
        kw_survival => survival_sec,
        r => r,
    }
}

pub(crate) fn from_pest(src: &Source, e: &Error<Rule>) -> Diagnostic {
    let text = src.text.as_str();
    let rule_pos = match e.location {
        InputLocation::Pos(p) => p,
        InputLocation::Span((s, _)) => s,
    };
    let mut rules: Vec<Rule> = match &e.variant {
        ErrorVariant::ParsingError { positives, .. } => positives.clone(),
        ErrorVariant::CustomError { message } => {
            // pest's own limits (call or stack limit): no expected set to show.
            return Diagnostic::new(src, Span::new(rule_pos, rule_pos), message.clone());
        }
    };
    let rule_pos = rule_pos.min(text.len());
    if rules.iter().all(|r| describe(*r).is_none()) {
        // Nothing nameable: the file starts with something that is neither a family
        // expression nor an item.
        let (found, len) = found_at(text, rule_pos);
        return Diagnostic::new(
            src,
            Span::new(rule_pos, rule_pos + len),
            format!("expected a family expression such as `WRN-28-10`, or `network`, found {found}"),
        )
        .with_help("a file is a family expression alone, or items such as `network WRN-28-10`, `dataset cifar10`, `epochs 200`");
    }

    // Literal tokens (punctuation) tried further than any rule win: `conv(3x3 16)` is missing
    // a `,`, which no rule names. Identifier characters (`_`, letters) only say that a word
    // could have gone on, and whitespace and comments may go anywhere: not worth listing.
    let mut pos = rule_pos;
    let mut tokens: Vec<String> = Vec::new();
    if let Some(attempts) = e.parse_attempts() {
        let punct: Vec<String> = attempts
            .expected_tokens()
            .iter()
            .map(|t| t.to_string()) // `ParsingToken` is not exported; `Display` is the literal
            .filter(|t| {
                !t.is_empty()
                    && t.chars()
                        .all(|c| c.is_ascii_punctuation() && c != '#' && c != '_')
            })
            .map(|t| format!("`{t}`"))
            .collect();
        // A word glued to the end of a token (`12abc`) is better reported from the start of
        // the token, by the rules.
        let glued = attempts.max_position <= text.len()
            && text[..attempts.max_position].ends_with(|c: char| c.is_alphanumeric() || c == '_')
            && text[attempts.max_position..].starts_with(|c: char| c.is_alphanumeric() || c == '_');
        if attempts.max_position > pos
            && !punct.is_empty()
            && !glued
            && attempts.max_position <= text.len()
        {
            pos = attempts.max_position;
            rules.clear();
            tokens = punct;
        } else if attempts.max_position == pos {
            tokens = punct;
        }
    }

    // Among layers, `dropout` and `classes` are the layer and the header line, not the
    // settings of the same names.
    let layer_context = rules
        .iter()
        .any(|r| matches!(r, Rule::conv | Rule::kw_conv));
    let context_rank = |r: Rule| match r {
        Rule::kw_dropout if layer_context => Rule::dropout,
        Rule::kw_classes if layer_context => Rule::classes_decl,
        r => rank(r),
    };
    rules.sort_by_key(|r| context_rank(*r));
    let mut names: Vec<&str> = Vec::new();
    for r in &rules {
        let name = match r {
            Rule::kw_dropout if layer_context => Some("`dropout(..)`"),
            r => describe(*r),
        };
        if let Some(n) = name {
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    tokens.sort();
    // The first characters of a number or a string are already said by naming it.
    if names.contains(&"a number") {
        tokens.retain(|t| t != "`-`" && t != "`.`");
    }
    if names.contains(&"a quoted name") {
        tokens.retain(|t| t != "`\"`");
    }
    for t in &tokens {
        if !names.contains(&t.as_str()) {
            names.push(t);
        }
    }
    let (found, len) = found_at(text, pos);
    let sp = Span::new(pos, pos + len);
    let expected = match names.len() {
        0 => "something else".to_string(),
        1 => names[0].to_string(),
        _ => format!("one of: {}", names.join(", ")),
    };
    let word = text[pos..].starts_with(|c: char| c.is_ascii_alphabetic() || c == '_');
    let layer_expected = names.contains(&"`bn`") && names.contains(&"`conv(..)`");
    let setting_expected = names.contains(&"`epochs`") && names.contains(&"`lr`");
    let found_word = &text[pos..pos + len];
    const SECTIONS: [&str; 5] = ["pre", "body", "shortcut", "post", "survival"];
    let section_expected = names
        .iter()
        .any(|n| ["pre", "body", "post", "survival"].contains(&n.trim_matches('`')));
    if word && section_expected && (SECTIONS.contains(&found_word) || !layer_expected) {
        return Diagnostic::new(src, sp, format!("expected {expected}, found {found}"))
            .with_help("the sections of `residual { .. }` come in the order pre, body, shortcut, post, survival, each at most once");
    }
    if word && layer_expected && ["input", "classes"].contains(&found_word) {
        return Diagnostic::new(src, sp, format!("{found} must come before the first layer"))
            .with_help("write `input` and `classes` at the top of the network's braces");
    }
    if word && layer_expected && SECTIONS.contains(&found_word) {
        return Diagnostic::new(src, sp, format!("unknown layer {found}")).with_help(format!(
            "{found} is a section of `residual {{ .. }}`; here, expected {expected}"
        ));
    }
    let top_level_only = [
        "network",
        "train",
        "dataset",
        "dropout",
        "shortcut",
        "stochastic_depth",
        "classes",
        "batch",
        "precision",
        "seed",
    ];
    if word
        && setting_expected
        && !names.contains(&"`network`")
        && top_level_only.contains(&found_word)
    {
        return Diagnostic::new(
            src,
            sp,
            format!("{found} cannot be set inside `train {{ .. }}`"),
        )
        .with_help(format!(
            "write it outside the braces; here, expected {expected}"
        ));
    }
    if word && layer_expected {
        return Diagnostic::new(src, sp, format!("unknown layer {found}"))
            .with_help(format!("expected {expected}"));
    }
    if word && setting_expected {
        let d = Diagnostic::new(src, sp, format!("unknown setting {found}"))
            .with_help(format!("expected {expected}"));
        return d;
    }
    if found == "`}`" && !names.contains(&"`}`") {
        return Diagnostic::new(src, sp, "unmatched `}`").with_help(format!("expected {expected}"));
    }
    let d = Diagnostic::new(src, sp, format!("expected {expected}, found {found}"));
    if found == "whitespace" && inside_token(text, pos) {
        return d.with_help(
            "family expressions (`WRN-28-10-B(3,3)`), kernel sizes (`3x3`) and shapes (`3x32x32`) are written without spaces",
        );
    }
    if found == "end of file" && names.contains(&"`}`") {
        if let Some(open) = crate::nesting::unclosed_brace(text) {
            let at = Diagnostic::new(src, Span::new(open, open + 1), "");
            return d
                .with_note(format!("unclosed `{{` at {}", at.location()))
                .with_help("add the missing `}`");
        }
    }
    if names == ["end of file"] {
        return d.with_help(
            "a family expression alone is a whole file; to add settings, write `network` before it: `network WRN-28-10`",
        );
    }
    d
}

/// How to name what was found at `pos`, and its length in bytes (>= 1 unless at the end).
fn found_at(text: &str, pos: usize) -> (String, usize) {
    let rest = &text[pos..];
    let Some(c) = rest.chars().next() else {
        return ("end of file".to_string(), 0);
    };
    if c.is_whitespace() {
        let n = rest
            .find(|c: char| !c.is_whitespace())
            .unwrap_or(rest.len());
        let n = rest[..n].find('\n').map_or(n, |i| i.max(1));
        return ("whitespace".to_string(), n);
    }
    let word = |c: char| c.is_alphanumeric() || c == '_' || c == '.';
    let n = if word(c) {
        rest.find(|c: char| !word(c)).unwrap_or(rest.len())
    } else {
        c.len_utf8()
    };
    // Keep messages short: a long word is shown cut.
    let shown: String = rest[..n].chars().take(40).collect();
    let shown = if shown.len() < n {
        format!("{shown}...")
    } else {
        shown
    };
    (format!("`{}`", shown.escape_default()), n)
}

/// Whether whitespace at `pos` interrupts a token (family expression, kernel, shape): the text
/// just before it is `,`, `(`, `-` or `x`.
fn inside_token(text: &str, pos: usize) -> bool {
    text[..pos]
        .chars()
        .next_back()
        .is_some_and(|c| matches!(c, ',' | '(' | '-' | 'x' | '@'))
}
