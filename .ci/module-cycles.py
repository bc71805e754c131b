#!/usr/bin/env python3
"""Finds import cycles between the modules of each crate of the workspace.

Usage: python3 .ci/module-cycles.py [--root DIR] [--edges]

Every crate under crates/ and examples/ is read from its src/ tree: src/lib.rs, src/main.rs and
src/bin/* are each the root of their own module tree, found by following `mod name;`
declarations (a module is a file: src/a/b.rs or src/a/b/mod.rs is `crate::a::b`). Modules
declared inline (`mod x { ... }`) belong to the file they are written in.

The rule. Module A depends on module B when code in A's file names B, or an item inside B, by a
path that starts with `crate::` (or `$crate::`) or `super::`: in a `use` declaration, or fully
qualified anywhere in the code (`crate::x::y::f()`, `super::T`). A path resolves to the longest
prefix of it that is a module (the crate root is `crate`); when that prefix is followed by a
name the module re-exports with an explicit `pub use` (not a glob), the path follows the
re-export to the module it points at, and so on. Private imports are not followed: `super::T`,
where the parent only imports `T`, lands in the parent. Not counted:
  - comments (doc comments too) and string literals;
  - `mod` declarations (a parent declaring its children);
  - a module's `pub use` of its own descendants (a lib.rs or mod.rs re-exporting its children);
  - paths that start with `self::` or with the name of a child module: a module naming its own
    children is the module tree itself, not a dependency;
  - paths in `pub(in ...)` visibilities;
  - references from an inline `#[cfg(test)] mod ... { }` block to its own module or one of its
    ancestors (`use super::*` in unit tests). Other references from test blocks count.

A cycle is a strongly connected component of more than one module. Each is printed as
`crate: a -> b -> a`, with one example reference (file:line) per edge, marked when it is in a
test block; a component bigger than the cycle printed is listed in full. Exit status: 1 when
any crate has a cycle, else 0. --edges prints every dependency found, to see why an edge is
there.

Python 3 standard library only; reads each source file once and takes well under a second.
"""

import argparse
import bisect
import re
import sys
from pathlib import Path

IDENT = r"(?:r#)?[A-Za-z_][A-Za-z0-9_]*"
MOD_DECL = re.compile(r"\bmod\s+(" + IDENT + r")\s*([;{])")
USE = re.compile(r"(?<![\w$])use\s+")
PATH = re.compile(r"(?<![\w$:])(\$?crate|super)((?:\s*::\s*" + IDENT + r")+)")
PUB_IN = re.compile(r"\bpub\s*\(\s*in\s+[^)]*\)")
CFG_TEST = re.compile(r"#\s*\[\s*cfg\s*\(([^\]]*)\)\s*\]")
PATH_ATTR = re.compile(r'#\s*\[\s*path\s*=\s*"([^"]*)"\s*\]')


def strip(text):
    """The text with comments and string and char literals blanked, newlines kept."""
    out = list(text)
    n = len(text)
    i = 0

    def blank(a, b):
        for k in range(a, b):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        c = text[i]
        if c == "/" and text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif c == "/" and text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            blank(i, j)
            i = j
        elif c in "rbc" and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'(?:br|cr|r)(#*)"', text[i:])
            if m:
                end = '"' + m.group(1)
                j = text.find(end, i + m.end())
                j = n if j < 0 else j + len(end)
                blank(i, j)
                i = j
            elif text.startswith(('b"', 'c"'), i):
                j = skip_quoted(text, i + 1, '"')
                blank(i, j)
                i = j
            elif text.startswith("b'", i):
                j = skip_quoted(text, i + 1, "'")
                blank(i, j)
                i = j
            else:
                i += 1
        elif c == '"':
            j = skip_quoted(text, i, '"')
            blank(i, j)
            i = j
        elif c == "'":
            # A char literal ('a', '\n', '\u{1F600}') or a lifetime ('a, 'static).
            if text.startswith("\\", i + 1):
                j = skip_quoted(text, i, "'")
                blank(i, j)
                i = j
            elif i + 2 < n and text[i + 2] == "'":
                blank(i, i + 3)
                i += 3
            else:
                i += 1
        else:
            i += 1
    return "".join(out)


def skip_quoted(text, i, quote):
    """The index just past the literal opening at text[i] == quote."""
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
        elif text[j] == quote:
            return j + 1
        else:
            j += 1
    return len(text)


def parse_use_tree(s):
    """The paths of a use tree: (segments, alias, glob), with `self` in a group folded into its prefix."""
    toks = re.findall(r"::|[{},*]|" + IDENT, s)
    pos = 0

    def tree(prefix):
        nonlocal pos
        segs = list(prefix)
        out = []
        while pos < len(toks):
            t = toks[pos]
            if t == "::":
                pos += 1
            elif t == "{":
                pos += 1
                while pos < len(toks) and toks[pos] != "}":
                    if toks[pos] == ",":
                        pos += 1
                        continue
                    out.extend(tree(segs))
                pos += 1
                return out
            elif t == "*":
                pos += 1
                return [(segs, None, True)]
            elif t in (",", "}"):
                break
            elif t == "as":
                alias = toks[pos + 1] if pos + 1 < len(toks) else "_"
                pos += 2
                return [(segs, alias, False)]
            elif t == "self" and prefix and segs == list(prefix):
                pos += 1  # `a::{self, b}`: `self` is `a` itself
            else:
                segs.append(t)
                pos += 1
        return out + [(segs, None, False)]

    return tree([])


class Crate:
    """The module tree of one crate root, each file read once."""

    def __init__(self):
        self.files = {}  # module path (tuple of names) -> file
        self.lines = {}  # module path -> the file's lines, as written
        self.code = {}  # module path -> the file's text, comments and literals blanked
        self.children = {}  # module path -> names of the file modules it declares
        self.reexports = {}  # module path -> {name: absolute segments} of its explicit `pub use`
        self.pub_use_spans = {}  # module path -> [(start, end)] of its `pub use` declarations
        self.tests = {}  # module path -> [(start, end, nesting)] of its inline cfg(test) blocks
        self.inline = {}  # module path -> [(start, end, nesting, is test)] of its inline modules

    def load(self, root):
        todo = [((), root)]
        while todo:
            mod, path = todo.pop()
            if mod in self.files or not path.is_file():
                continue
            raw = path.read_text(encoding="utf-8", errors="replace")
            code = strip(raw)
            self.files[mod] = path
            self.lines[mod] = raw.split("\n")
            self.code[mod] = code
            self.children.setdefault(mod, set())
            # A crate root and a mod.rs keep their children beside them; a.rs keeps them in a/.
            base = path.parent if mod == () or path.name == "mod.rs" else path.parent / path.stem
            blocks = inline_blocks(code)
            self.inline[mod] = blocks
            self.tests[mod] = [(a, b, names) for a, b, names, test in blocks if test]
            for m in MOD_DECL.finditer(code):
                name = m.group(1).removeprefix("r#")
                nest = [b[2] for b in blocks if b[0] < m.start() < b[1]]
                nest = max(nest, key=len) if nest else ()
                if m.group(2) == "{":
                    continue
                if not nest:
                    self.children[mod].add(name)
                attr = PATH_ATTR.search(raw[item_start(code, m.start()) : m.start()])
                if attr and not nest:
                    target = path.parent / attr.group(1)
                else:
                    d = base.joinpath(*nest)
                    target = d / (name + ".rs")
                    if not target.is_file():
                        target = d / name / "mod.rs"
                todo.append((mod + tuple(nest) + (name,), target))
        for mod in self.files:
            self.reexports[mod], self.pub_use_spans[mod] = self.read_reexports(mod)

    def read_reexports(self, mod):
        code = self.code[mod]
        found, spans = {}, []
        for m in USE.finditer(code):
            end = code.find(";", m.end())
            if end < 0:
                continue
            before = code[max(0, m.start() - 40) : m.start()]
            if not re.search(r"\bpub(?:\s*\([^)]*\))?\s*$", before):
                continue
            spans.append((m.start(), end))
            if self.nesting(mod, m.start()):
                continue
            for segs, alias, glob in parse_use_tree(code[m.end() : end]):
                if glob or not segs:
                    continue
                target = self.absolute(mod, (), segs, bare_children=True)
                if target is not None:
                    found[alias or segs[-1]] = target
        return found, spans

    def nesting(self, mod, pos):
        """The names of the inline modules around `pos` in the file of `mod`, outermost first."""
        inside = [b for b in self.inline[mod] if b[0] < pos < b[1]]
        return max((b[2] for b in inside), key=len) if inside else ()

    def absolute(self, mod, nest, segs, bare_children=False):
        """Absolute segments of a path written in module `mod` (inside inline modules `nest`)."""
        segs = [s.removeprefix("r#") for s in segs]
        here = list(mod) + list(nest)
        if segs[0] in ("crate", "$crate"):
            return tuple(segs[1:])
        if segs[0] == "super":
            while segs and segs[0] == "super":
                if not here:
                    return None
                here.pop()
                segs = segs[1:]
            return tuple(here + segs)
        if segs[0] == "self":
            return tuple(here + segs[1:])
        if bare_children and not nest and segs[0] in self.children.get(mod, ()):
            return tuple(here + segs)
        return None

    def resolve(self, segs, depth=0):
        """The file module a path (absolute segments) lands in, following explicit re-exports."""
        for k in range(len(segs), -1, -1):
            if tuple(segs[:k]) in self.files:
                mod, rest = tuple(segs[:k]), segs[k:]
                break
        if rest and depth < 8 and rest[0] in self.reexports.get(mod, {}):
            return self.resolve(tuple(self.reexports[mod][rest[0]]) + tuple(rest[1:]), depth + 1)
        return mod


def item_start(code, pos):
    """Where the item whose keyword is at `pos` starts, its attributes included."""
    return max(code.rfind(";", 0, pos), code.rfind("}", 0, pos), code.rfind("{", 0, pos)) + 1


def inline_blocks(code):
    """Inline module blocks of a file: (start, end, nesting names, is cfg(test))."""
    opens = {}
    for m in MOD_DECL.finditer(code):
        if m.group(2) != "{":
            continue
        attrs = code[item_start(code, m.start()) : m.start()]
        test = any(
            re.search(r"\btest\b", a.group(1)) and not re.search(r"\bnot\s*\(\s*test\b", a.group(1))
            for a in CFG_TEST.finditer(attrs)
        )
        opens[m.end() - 1] = (m.group(1).removeprefix("r#"), test)
    blocks, stack = [], []
    for i, c in enumerate(code):
        if c == "{":
            stack.append((i, opens.get(i)))
        elif c == "}" and stack:
            start, info = stack.pop()
            if info:
                outer = [s[1][0] for s in stack if s[1]]
                test = info[1] or any(s[1][1] for s in stack if s[1])
                blocks.append((start, i, tuple(outer) + (info[0],), test))
    return blocks


def edges_of(crate):
    """Dependencies between the file modules of a crate: {(a, b): (file, line, text, in test)}."""
    edges = {}
    for mod, code in crate.code.items():
        source = crate.lines[mod]
        lines = [0] + [i + 1 for i, c in enumerate(code) if c == "\n"]
        masked = PUB_IN.sub(lambda m: " " * len(m.group(0)), code)
        refs = []  # (position, absolute segments, is a pub use)
        use_spans = []
        for m in USE.finditer(masked):
            end = masked.find(";", m.end())
            if end < 0:
                continue
            use_spans.append((m.start(), end))
            is_pub = any(a == m.start() for a, _ in crate.pub_use_spans[mod])
            nest = crate.nesting(mod, m.start())
            for segs, _alias, _glob in parse_use_tree(masked[m.end() : end]):
                if segs and segs[0] in ("crate", "$crate", "super"):
                    target = crate.absolute(mod, nest, segs)
                    if target is not None:
                        refs.append((m.start(), target, is_pub))
        for m in PATH.finditer(masked):
            if any(a <= m.start() <= b for a, b in use_spans):
                continue
            segs = [m.group(1)] + re.findall(IDENT, m.group(2))
            target = crate.absolute(mod, crate.nesting(mod, m.start()), segs)
            if target is not None:
                refs.append((m.start(), target, False))
        for pos, target, is_pub in sorted(refs, key=lambda r: r[0]):
            to = crate.resolve(target)
            if to == mod:
                continue
            if is_pub and to[: len(mod)] == mod:
                continue  # a module re-exporting its own descendants
            in_test = any(a < pos < b for a, b, _ in crate.tests[mod])
            if in_test and mod[: len(to)] == to:
                continue  # unit tests using their own module or its ancestors
            line = bisect.bisect_right(lines, pos) - 1
            text = source[line].strip() + ("  [in a #[cfg(test)] block]" if in_test else "")
            # The example of an edge is its first reference outside tests, if it has one.
            if (mod, to) not in edges or (edges[(mod, to)][3] and not in_test):
                edges[(mod, to)] = (crate.files[mod], line + 1, text, in_test)
    return edges


def components(nodes, edges):
    """Strongly connected components (Tarjan, iterative)."""
    succ = {n: sorted({b for a, b in edges if a == n}) for n in nodes}
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on.add(v)
            recurse = False
            for k in range(i, len(succ[v])):
                w = succ[v][k]
                if w not in index:
                    work.append((v, k + 1))
                    work.append((w, 0))
                    recurse = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if recurse:
                continue
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                out.append(sorted(comp))
            if work:
                u = work[-1][0]
                low[u] = min(low[u], low[v])
    return out


def a_cycle(comp, edges):
    """A shortest cycle through the first module of a component, as a list of modules."""
    members = set(comp)
    start = comp[0]
    prev = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for a, b in sorted(edges):
            if a != v or b not in members:
                continue
            if b == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return list(reversed(path)) + [start]
            if b not in prev:
                prev[b] = v
                queue.append(b)
    return [start, start]


def name(mod):
    return "::".join(mod) if mod else "crate"


def crates(root):
    for group in ("crates", "examples"):
        for d in sorted((root / group).glob("*")):
            src = d / "src"
            manifest = d / "Cargo.toml"
            if not src.is_dir() or not manifest.is_file():
                continue
            m = re.search(r'(?m)^\s*name\s*=\s*"([^"]+)"', manifest.read_text(encoding="utf-8"))
            package = m.group(1) if m else d.name
            if (src / "lib.rs").is_file():
                yield package, src / "lib.rs"
            if (src / "main.rs").is_file():
                yield package + " (bin)", src / "main.rs"
            for b in sorted((src / "bin").glob("*")) if (src / "bin").is_dir() else []:
                main = b / "main.rs" if b.is_dir() else b
                if main.suffix == ".rs" and main.is_file():
                    yield f"{package} (bin {b.stem})", main


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--edges", action="store_true", help="print every dependency found")
    args = parser.parse_args()
    root = args.root.resolve()
    found = 0
    checked = modules = 0
    for label, root_file in crates(root):
        crate = Crate()
        crate.load(root_file)
        edges = edges_of(crate)
        checked += 1
        modules += len(crate.files)
        if args.edges:
            for (a, b), (f, line, text, _) in sorted(edges.items()):
                print(f"{label}: {name(a)} -> {name(b)}  {f.relative_to(root)}:{line}  {text}")
        for comp in components(set(crate.files), edges):
            if len(comp) < 2:
                continue
            found += 1
            cycle = a_cycle(comp, edges)
            print(f"{label}: " + " -> ".join(name(m) for m in cycle))
            for a, b in zip(cycle, cycle[1:]):
                f, line, text, _ = edges[(a, b)]
                print(f"    {name(a)} -> {name(b)}: {f.relative_to(root)}:{line}: {text}")
            if len(comp) > len(cycle) - 1:
                print(f"    (one knot of {len(comp)} modules: {', '.join(name(m) for m in comp)})")
    if found:
        print(f"module-cycles: {found} cycle(s) found in {checked} crate roots ({modules} modules)")
        return 1
    print(f"module-cycles: no cycles in {checked} crate roots ({modules} modules)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
