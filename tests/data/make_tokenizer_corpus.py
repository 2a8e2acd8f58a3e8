"""Writes tests/data/tokenizer_corpus.jsonl: seeded, varied strings for tokenizer parity tests.

One JSON object per line: {"category": str, "text": str}. Nothing is downloaded: strings come from
handwritten samples and from Unicode code point ranges filtered with unicodedata (so the output
depends on the Python version's Unicode database; the committed file was made with 3.11). Category
"raw_u2581" holds text containing U+2581 itself, which the Gemma tokenizer treats as a space on the
way in and turns into ' ' on the way out (so it never round-trips); tests treat it separately.

    python tests/data/make_tokenizer_corpus.py        # rewrites the .jsonl next to this script
"""

import json
import random
import unicodedata
from pathlib import Path

SEED = 20250301
OUT = Path(__file__).with_name("tokenizer_corpus.jsonl")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you doing today?",
    "Machine learning models transform input tokens into probability distributions.",
    "Don't stop believin' — hold on to that feelin'.",
    "Le cœur a ses raisons que la raison ne connaît point.",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein.",
    "¿Dónde está la biblioteca? ¡Está aquí!",
    "Ação, coração, pão e informação são palavras portuguesas.",
    "Zażółć gęślą jaźń — polski pangram.",
    "Příliš žluťoučký kůň úpěl ďábelské ódy.",
    "Árvíztűrő tükörfúrógép.",
    "Pchnąć w tę łódź jeża lub ośm skrzyń fig.",
    "Şu çılgın türk işçisi ağır öğüt gözlüğü aldı.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Љубазни фењерџија чађавог лица хоће да ми покаже штос.",
    "Τάχιστη αλώπηξ βαφής ψημένη γη, δρασκελίζει υπέρ νωθρού κυνός.",
    "صِف خَلقَ خَودِ كَمِثلِ الشَمسِ إِذ بَزَغَت",
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "דג סקרן שט בים מאוכזב ולפתע מצא חברה.",
    "שלום עולם! מה שלומך?",
    "ऋषियों को सताने वाले दुष्ट राक्षसों के राजा रावण का सर्वनाश करने वाले विष्णुवतार भगवान श्रीराम।",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "আমি বাংলায় গান গাই।",
    "தமிழ் ஒரு பழமையான மொழி.",
    "我能吞下玻璃而不伤身体。",
    "你好，世界！今天天气很好。",
    "いろはにほへと ちりぬるを わかよたれそ つねならむ",
    "日本語のテキストを正しくトークン化できますか？",
    "다람쥐 헌 쳇바퀴에 타고파.",
    "안녕하세요, 세계! 만나서 반갑습니다.",
    "เป็นมนุษย์สุดประเสริฐเลิศคุณค่า กว่าบรรดาฝูงสัตว์เดรัจฉาน",
    "สวัสดีชาวโลก ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ",
    "Tiếng Việt có nhiều dấu thanh: à á ả ã ạ.",
    "ქართული ენა ძალიან ლამაზია.",
    "Հայերենը հնդեվրոպական լեզու է։",
    "ᐊᐃᓐᓇᐅᔭᖅ ᐃᓄᒃᑎᑐᑦ",
    "ሰላም ለዓለም",
    "Ελληνικά και English mixed μαζί with 中文 and العربية.",
    "E = mc² and ∫₀^∞ e^{-x²} dx = √π / 2; ∀x ∈ ℝ, x² ≥ 0.",
    "Price: $1,234.56 — €99,99 — ¥10 000 — £5.",
    "Visit https://example.com/path?query=1&b=2#frag or mail someone@example.org.",
    "2024-03-01T12:34:56Z, 3.14159, -42, 1e-9, 0xDEADBEEF, 0b1010.",
    "ﬁ ﬂ ﬀ Ⅻ ① ㈱ ｶﾀｶﾅ ＦＵＬＬＷＩＤＴＨ",
    "Combining: e\u0301 a\u0308 n\u0303 o\u0302\u0323",
]

CODE = [
    'def fib(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n'
    "    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    '#include <stdio.h>\n\nint main(void)\n{\n\tprintf("hello %d\\n", 42);\n\treturn 0;\n}\n',
    "function add(a, b) {\n  return a + b;\n}\nconsole.log(add(1, 2)); // 3\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n"
    '    println!("{:?}", v);\n}\n',
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC LIMIT 10;",
    '#!/bin/bash\nset -euo pipefail\nfor f in *.txt; do\n  wc -l "$f"\ndone\n',
    '{"name": "gemma", "layers": 18, "vocab": [1, 2, 3], "nested": {"ok": true, "x": null}}',
    'package main\n\nimport "fmt"\n\nfunc main() {\n\tfmt.Println("hi")\n}\n',
    "public class Hello {\n    public static void main(String[] args) {\n"
    '        System.out.println("Hello");\n    }\n}\n',
    "template <typename T>\nstd::vector<T> twice(const std::vector<T>& v) {\n"
    "    std::vector<T> out;\n    for (auto& x : v) { out.push_back(x); out.push_back(x); }\n"
    "    return out;\n}\n",
    "\\begin{equation}\n  \\sum_{i=1}^{n} i = \\frac{n(n+1)}{2}\n\\end{equation}\n",
    "x <- c(1, 2, 3)\nmean(x) |> print()\n",
    "main = do\n  let xs = [1..10] :: [Int]\n  print (sum xs)\n",
    "  - name: build\n    run: |\n      make -j4\n      make test\n",
    "<?php echo htmlspecialchars($_GET['q'] ?? ''); ?>",
    "if (a && b || !c) { x += 1; } else if (y != z) { y <<= 2; }",
    "    \t    mixed    \t\tindentation\t  \n",
]

HTML_TAGS = [
    "table",
    "caption",
    "thead",
    "tbody",
    "tfoot",
    "tr",
    "th",
    "td",
    "div",
    "span",
    "p",
    "a",
    "b",
    "i",
    "u",
    "em",
    "strong",
    "code",
    "pre",
    "ul",
    "ol",
    "li",
    "h1",
    "h2",
    "h3",
    "br",
    "img",
    "blockquote",
    "header",
    "footer",
    "section",
    "article",
    "nav",
    "main",
    "sub",
    "sup",
]

SPECIALS = [
    "<bos>",
    "<eos>",
    "<pad>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
    "<unused0>",
    "<unused42>",
    "<unused98>",
    "[multimodal]",
]
NEAR_SPECIALS = [
    "<bos",
    "bos>",
    "<start_of_turn",
    "<<bos>>",
    "< bos >",
    "<BOS>",
    "<end_of_turn >",
    "</start_of_turn>",
    "<unused>",
    "<unused999>",
    "<start_of_turn><start_of_turn>",
]

WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which she "
    "do how their if will up other about out many then them these so some her would make like "
    "him into time has look two more write go see number no way could people my than first water "
    "been call who oil its now find long down day did get come made may part tokenizer model "
    "attention transformer gradient embedding vocabulary sentencepiece byte fallback merge"
).split()

EMOJI = [
    "🙂",
    "😀",
    "😂",
    "🤖",
    "🚀",
    "🎉",
    "❤️",
    "✨",
    "🔥",
    "👍",
    "👍🏻",
    "👍🏽",
    "👍🏿",
    "👋🏼",
    "👨‍👩‍👧‍👦",
    "👩‍💻",
    "🧑🏾‍🚀",
    "🏳️‍🌈",
    "🏴‍☠️",
    "❤️‍🔥",
    "🫶🏽",
    "🇫🇷",
    "🇯🇵",
    "🇺🇸",
    "🇧🇷",
    "🇺🇦",
    "🏴󠁧󠁢󠁳󠁣󠁴󠁿",
    "1️⃣",
    "#️⃣",
    "©️",
    "™️",
    "☺︎",
    "🦄",
    "🧬",
    "🪐",
    "🫠",
]

# (name, [(lo, hi), ...]) inclusive code point ranges; only assigned, non-surrogate chars are used
SCRIPTS = [
    ("latin", [(0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F), (0x1E00, 0x1EFF)]),
    ("cyrillic", [(0x400, 0x4FF)]),
    ("greek", [(0x370, 0x3FF), (0x1F00, 0x1FFF)]),
    ("arabic", [(0x600, 0x6FF), (0xFB50, 0xFDFF)]),
    ("hebrew", [(0x591, 0x5F4)]),
    ("devanagari", [(0x900, 0x97F)]),
    ("bengali", [(0x980, 0x9FF)]),
    ("thai", [(0xE01, 0xE5B)]),
    ("hangul", [(0xAC00, 0xD7A3), (0x1100, 0x11FF), (0x3130, 0x318F)]),
    ("kana", [(0x3041, 0x30FF)]),
    ("cjk", [(0x4E00, 0x9FFF)]),
    ("cjk_ext_a", [(0x3400, 0x4DBF)]),
    ("cjk_ext_b", [(0x20000, 0x2A6DF)]),
    ("cjk_ext_cdefg", [(0x2A700, 0x2EBEF), (0x30000, 0x3134F)]),
    ("ethiopic", [(0x1200, 0x137F)]),
    ("georgian_armenian", [(0x10A0, 0x10FF), (0x531, 0x58A)]),
    ("symbols", [(0x2000, 0x2BFF)]),
    ("math_alnum", [(0x1D400, 0x1D7FF)]),
    ("private_use", [(0xE000, 0xF8FF), (0xF0000, 0xF00FF), (0x100000, 0x1000FF)]),
    ("control", [(0x00, 0x08), (0x0B, 0x1F), (0x7F, 0x9F)]),
    ("emoji_range", [(0x1F300, 0x1FAFF)]),
    ("misc_rare", [(0x10000, 0x1018F), (0x10300, 0x1034F), (0x13000, 0x1342F), (0x1F000, 0x1F0FF)]),
]


def _chars(ranges, keep_unassigned=False):
    out = []
    for lo, hi in ranges:
        for cp in range(lo, hi + 1):
            if 0xD800 <= cp <= 0xDFFF or cp == 0x2581:
                continue
            c = chr(cp)
            if keep_unassigned or unicodedata.category(c) != "Cn":
                out.append(c)
    return out


def _ws(rng):
    kind = rng.choice([" ", "\t", "\n", "\r\n", " \t", "\n "])
    n = rng.choice([1, 2, 3, 4, 7, 8, 15, 16, 30, 31, 32, 33, 40, 63, 64, 65, 100])
    return kind * n


def generate():
    rng = random.Random(SEED)
    items = []

    def add(cat, text):
        if cat != "raw_u2581":
            text = text.replace("\u2581", " ")
        items.append({"category": cat, "text": text})

    add("empty", "")
    for s in SENTENCES:
        add("sentence", s)
        add("sentence_pad", " " + s + " ")
        add("sentence_pad", "  " + s.lower() + "\n")
    for c in CODE:
        add("code", c)
        add("code", c.replace("    ", "\t"))
        add("code", c.replace("\n", "\r\n"))

    script_chars = {name: _chars(r) for name, r in SCRIPTS}
    for name, chars in script_chars.items():
        for _ in range(40):
            words = []
            for _ in range(rng.randint(1, 12)):
                words.append("".join(rng.choice(chars) for _ in range(rng.randint(1, 8))))
            sep = rng.choice([" ", " ", " ", "", "  ", "\n", ", "])
            text = sep.join(words)
            if rng.random() < 0.3:
                text = rng.choice([" ", "  ", "\t", "\n"]) + text
            if rng.random() < 0.3:
                text += rng.choice([" ", "   ", ".", "\n\n"])
            add("script_" + name, text)
    unassigned = _chars([(0x0870, 0x089F), (0x2FE0, 0x2FEF), (0xE0080, 0xE00FF)], True)
    for _ in range(30):
        add("unassigned", "".join(rng.choice(unassigned) for _ in range(rng.randint(1, 6))))

    for _ in range(150):
        n = rng.randint(1, 10)
        parts = []
        for _ in range(n):
            parts.append(rng.choice(EMOJI))
            if rng.random() < 0.4:
                parts.append(rng.choice([" ", "", "\n", " and "]) + rng.choice(WORDS))
        add("emoji", "".join(parts))

    for _ in range(200):
        parts = []
        for _ in range(rng.randint(1, 6)):
            parts.append(_ws(rng) if rng.random() < 0.5 else rng.choice(WORDS))
        add("whitespace", "".join(parts))
    for n in (1, 2, 3, 30, 31, 32, 33, 61, 62, 63, 64, 93, 100, 200):
        for c in (" ", "\t", "\n"):
            add("ws_run", c * n)
            add("ws_run", "x" + c * n + "y")

    for _ in range(150):
        parts = []
        for _ in range(rng.randint(1, 8)):
            tag = rng.choice(HTML_TAGS)
            attrs = rng.choice(["", ' class="x"', " id='main'", ' href="https://a.b/c"'])
            inner = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 4)))
            parts.append(f"<{tag}{attrs}>{inner}</{tag}>" if rng.random() < 0.8 else f"<{tag}/>")
        add("html", rng.choice(["", "\n", "  "]).join(parts))

    for _ in range(200):
        parts = []
        for _ in range(rng.randint(1, 6)):
            r = rng.random()
            if r < 0.35:
                parts.append(rng.choice(SPECIALS))
            elif r < 0.5:
                parts.append(rng.choice(NEAR_SPECIALS))
            else:
                parts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))))
            if rng.random() < 0.3:
                parts.append(rng.choice([" ", "\n", "\n\n"]))
        add("special_text", "".join(parts))
    for _ in range(40):
        turns = []
        for _ in range(rng.randint(1, 4)):
            role = rng.choice(["user", "model", "system"])
            msg = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
            turns.append(f"<start_of_turn>{role}\n{msg}<end_of_turn>\n")
        add("chat", rng.choice(["<bos>", ""]) + "".join(turns) + "<start_of_turn>model\n")

    for _ in range(300):
        words = []
        for _ in range(rng.randint(1, 30)):
            w = rng.choice(WORDS)
            r = rng.random()
            if r < 0.1:
                w = w.capitalize()
            elif r < 0.15:
                w = w.upper()
            elif r < 0.2:
                w = str(rng.randint(0, 10 ** rng.randint(1, 9)))
            elif r < 0.25:
                w += rng.choice([".", ",", "!", "?", ";", ":", "'s", "-", "..."])
            words.append(w)
        add("english", " ".join(words))

    cats = [c for c in {it["category"] for it in items} if c != "empty"]
    by_cat = {c: [it["text"] for it in items if it["category"] == c] for c in cats}
    for _ in range(300):
        parts = [rng.choice(by_cat[rng.choice(sorted(cats))]) for _ in range(rng.randint(2, 5))]
        add("mixed", rng.choice(["", " ", "\n", "  "]).join(parts))
    for _ in range(6):
        parts = [rng.choice(by_cat[rng.choice(sorted(cats))]) for _ in range(rng.randint(30, 80))]
        add("long", "\n".join(parts))

    for s in ["▁", "▁▁", "▁▁▁x", "a▁b", "▁hello", "x ▁ y", "▁" * 40, "<▁>", "▁<bos>"]:
        add("raw_u2581", s)
    return items


def main():
    items = generate()
    with open(OUT, "w", encoding="utf-8", newline="\n") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=True) + "\n")
    print(f"wrote {len(items)} strings to {OUT}")


if __name__ == "__main__":
    main()
