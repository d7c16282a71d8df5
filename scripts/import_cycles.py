"""Find import cycles among dstack modules: mode 'top' = module-level (not TYPE_CHECKING), 'all' = + function-level."""
import ast, sys, pathlib
root = pathlib.Path(sys.argv[1])
mods = {}
for p in root.joinpath("dstack").rglob("*.py"):
    rel = p.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__": parts = parts[:-1]
    mods[".".join(parts)] = p
def resolve(name):
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None
def edges(mode):
    g = {m: set() for m in mods}
    for m, p in mods.items():
        tree = ast.parse(p.read_text())
        def visit(node, top, tc):
            for ch in ast.iter_child_nodes(node):
                if isinstance(ch, ast.If) and "TYPE_CHECKING" in ast.unparse(ch.test):
                    continue
                if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    if mode == "all": visit(ch, False, tc)
                    continue
                names = []
                if isinstance(ch, ast.Import): names = [a.name for a in ch.names]
                elif isinstance(ch, ast.ImportFrom) and ch.module and ch.level == 0:
                    names = [ch.module] + [ch.module + "." + a.name for a in ch.names]
                for n in names:
                    if n.startswith("dstack"):
                        r = resolve(n)
                        if r and r != m and not m.startswith(r + ".") : g[m].add(r)
                visit(ch, top, tc)
        visit(tree, True, False)
    return g
def sccs(g):
    idx, low, st, on, out, c = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)
    def sc(v):
        idx[v] = low[v] = c[0]; c[0] += 1; st.append(v); on.add(v)
        for w in g[v]:
            if w not in idx: sc(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], idx[w])
        if low[v] == idx[v]:
            comp = []
            while True:
                w = st.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: out.append(sorted(comp))
    for v in g:
        if v not in idx: sc(v)
    return out
for mode in ("top", "all"):
    cs = sccs(edges(mode))
    print(mode, len(mods), "modules;", len(cs), "cycle groups")
    for comp in cs: print("  ", comp)
