// The parts every meshtrace HTML page shares: escaping, the stylesheet and the pager script.
// A report must open anywhere — from a mail attachment, on an air-gapped node — so nothing is fetched:
// styles, script and drawings are all inline.

enum HTML {
    /// Text for element content and attribute values.
    static func escape(_ s: String) -> String {
        var out = ""
        out.reserveCapacity(s.utf8.count)
        for c in s.unicodeScalars {
            switch c {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            case "'": out += "&#39;"
            default: out.unicodeScalars.append(c)
            }
        }
        return out
    }

    /// A JSON string literal that is also safe inside `<script>`: `<`, `>` and `&` are escaped, so
    /// no "</script>" or "<!--" can appear, and U+2028/2029 are escaped for old parsers.
    static func jsonString(_ s: String) -> String {
        var out = "\""
        out.reserveCapacity(s.utf8.count + 16)
        for c in s.unicodeScalars {
            switch c {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case "<": out += "\\u003c"
            case ">": out += "\\u003e"
            case "&": out += "\\u0026"
            case "\u{2028}": out += "\\u2028"
            case "\u{2029}": out += "\\u2029"
            default:
                if c.value < 0x20 {
                    let h = String(c.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - h.count) + h
                } else {
                    out.unicodeScalars.append(c)
                }
            }
        }
        return out + "\""
    }

    static func head(title: String) -> String {
        """
        <!DOCTYPE html>
        <html lang="en"><head><meta charset="utf-8">
        <meta name="viewport" content="width=device-width, initial-scale=1">
        <meta name="generator" content="meshtrace">
        <title>\(escape(title))</title>
        <style>\(stylesheet)</style>
        </head><body>

        """
    }

    static let stylesheet = """
    :root{--fg:#1d2430;--muted:#5b6474;--line:#d7dce4;--bg:#f6f7f9;--card:#fff;--esc:#c62828;--escbg:#fdecea;
    --warn:#8a5a00;--warnbg:#fff4d6;--ok:#1b7f3b;--okbg:#e7f6ec;--nf:#5b3cc4;--zt:#0b6bcb;--mark:#b25e00}
    *{box-sizing:border-box}
    body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--fg);background:var(--bg)}
    header.top{background:#16202e;color:#fff;padding:14px 24px}
    header.top h1{margin:0;font-size:20px;font-weight:600}
    header.top .sub{color:#b8c2d3;font-size:13px;margin-top:2px}
    main{padding:16px 24px;max-width:1280px}
    section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:14px 18px;margin:0 0 16px}
    h2{font-size:16px;margin:0 0 10px}
    h3{font-size:14px;margin:0 0 6px}
    code,.mono{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12.5px}
    .stats{display:flex;flex-wrap:wrap;gap:10px;margin:0}
    .stat{background:var(--bg);border:1px solid var(--line);border-radius:6px;padding:6px 12px;min-width:120px}
    .stat b{display:block;font-size:20px}
    .stat.esc{background:var(--escbg);border-color:#f3b8b3;color:var(--esc)}
    .stat.ok{background:var(--okbg);border-color:#b9e2c6;color:var(--ok)}
    .finding{border-left:4px solid var(--esc);background:var(--escbg);padding:8px 12px;margin:0 0 8px;border-radius:4px}
    .finding.bydesign{border-color:#e0a800;background:var(--warnbg)}
    .finding .cls{font-weight:700;color:var(--esc);text-transform:uppercase;font-size:12px;letter-spacing:.04em}
    .finding.bydesign .cls{color:var(--warn)}
    .clean{border-left:4px solid var(--ok);background:var(--okbg);padding:8px 12px;border-radius:4px}
    table{border-collapse:collapse;width:100%}
    th,td{text-align:left;padding:4px 8px;border-bottom:1px solid var(--line);vertical-align:top}
    th{font-size:12px;color:var(--muted);font-weight:600;text-transform:uppercase;letter-spacing:.03em}
    tr.esc td{background:var(--escbg)}
    tr.bypass td{background:var(--warnbg)}
    td.num{text-align:right;font-variant-numeric:tabular-nums}
    .pill{display:inline-block;border-radius:10px;padding:0 8px;font-size:12px;background:#eef1f5;border:1px solid var(--line)}
    .pill.esc{background:var(--escbg);color:var(--esc);border-color:#f3b8b3;font-weight:600}
    .pill.ok{background:var(--okbg);color:var(--ok);border-color:#b9e2c6}
    .pill.warn{background:var(--warnbg);color:var(--warn);border-color:#f0d58a}
    .muted{color:var(--muted)}
    .flow{border-top:1px solid var(--line);padding:12px 0 4px}
    .flow:first-child{border-top:0}
    .flow.escape h3{color:var(--esc)}
    .evidence{margin:4px 0 0 0;padding-left:18px;color:var(--muted);font-size:12.5px}
    .scroll{overflow-x:auto}
    .pager{display:flex;align-items:center;gap:8px;margin:6px 0 10px;flex-wrap:wrap}
    .pager button{font:inherit;padding:2px 10px;border:1px solid var(--line);border-radius:5px;background:#fff;cursor:pointer}
    .pager button:disabled{opacity:.4;cursor:default}
    .pager input{font:inherit;padding:2px 8px;border:1px solid var(--line);border-radius:5px;min-width:240px}
    a{color:var(--zt)}
    svg text{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace}
    svg.seq .life{stroke:#c3cad6;stroke-dasharray:4 4}
    svg.seq .lifehead{fill:#16202e}
    svg.seq .lifehead.nf{fill:var(--nf)}
    svg.seq .lifehead.zt{fill:var(--zt)}
    svg.seq .lifename{fill:#fff;font-size:12px;font-weight:600}
    svg.seq .arrow{stroke:#394355;stroke-width:1.4;fill:none}
    svg.seq .arrow.reply{stroke-dasharray:5 3}
    svg.seq .arrow.hit{stroke:var(--nf)}
    svg.seq .arrow.marked{stroke:var(--mark)}
    svg.seq .arrow.esc,.flow.escape svg.seq .arrow:not(.hit){stroke:var(--esc);stroke-width:2}
    svg.seq .lbl{font-size:11px;fill:#263041}
    svg.seq .lbl.hit{fill:var(--nf)}
    svg.seq .lbl.esc{fill:var(--esc);font-weight:700}
    svg.seq .time{font-size:10px;fill:var(--muted)}
    svg.seq .hitbox{fill:#efeafd;stroke:var(--nf)}
    svg.seq .elided{font-size:11px;fill:var(--muted);font-style:italic}
    svg.seq .connband{fill:#f2f5f9}
    svg.rules .hook{fill:#16202e}
    svg.rules .hookname{fill:#fff;font-size:12px;font-weight:600}
    svg.rules .chain{fill:#fff;stroke:#9aa5b5}
    svg.rules .chainhead{fill:#e9edf3}
    svg.rules .chainname{font-size:12px;font-weight:700;fill:#16202e}
    svg.rules .rule{font-size:11px;fill:#263041}
    svg.rules .rule.hot{fill:var(--nf);font-weight:700}
    svg.rules .rule.capture{fill:var(--zt)}
    svg.rules .rule.foreign{fill:var(--esc);font-weight:700}
    svg.rules .edge{stroke:#7a8699;stroke-width:1.3;fill:none}
    svg.rules .edge.jump{stroke:var(--nf)}
    svg.rules .note{font-size:10px;fill:var(--muted)}
    """

    /// Paging of the connection index and of the diagrams, from JSON embedded in the page. The first page
    /// is also in the markup, so the report reads without script too.
    static let pagerScript = """
    (function(){
    function data(id){var e=document.getElementById(id);return e?JSON.parse(e.textContent):[];}
    var conns=data('mt-conns'), box=document.getElementById('mt-diagrams');
    var nflows=box?parseInt(box.getAttribute('data-flows'),10):0, page1=box?box.innerHTML:'';
    var FP=__FLOWS_PER_PAGE__, CP=__CONNS_PER_PAGE__;
    var flowPage=0, connPage=0, filter='';
    function esc(s){return String(s).replace(/[&<>"]/g,function(c){return {'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c];});}
    function showFlows(p){
      var n=Math.max(1,Math.ceil(nflows/FP)); p=Math.max(0,Math.min(n-1,p));
      if(!box||p==flowPage) return; flowPage=p;
      var stored=document.getElementById('mt-page-'+(p+1));
      box.innerHTML=p==0?page1:(stored?stored.textContent:'');
      document.getElementById('mt-flow-page').textContent='page '+(p+1)+' of '+n+' ('+nflows+' diagrams)';
      document.getElementById('mt-flow-prev').disabled=p==0;
      document.getElementById('mt-flow-next').disabled=p>=n-1;
    }
    function visibleConns(){
      if(!filter) return conns;
      var f=filter.toLowerCase();
      return conns.filter(function(c){return (c.join(' ')).toLowerCase().indexOf(f)>=0;});
    }
    function showConns(p){
      var list=visibleConns(), n=Math.max(1,Math.ceil(list.length/CP)); p=Math.max(0,Math.min(n-1,p)); connPage=p;
      var rows=list.slice(p*CP,(p+1)*CP).map(function(c){
        return '<tr class="'+(c[6]?'esc':'')+'"><td class="num">#'+c[0]+'</td><td>'+esc(c[1])+'</td><td class="mono">'+esc(c[2])+
          '</td><td class="num">'+c[3]+'</td><td>'+esc(c[4])+'</td><td>'+(c[5]>=0?'<a href="#flow='+c[5]+'" data-flow="'+c[5]+'">diagram</a>':'<span class="muted">not drawn</span>')+
          (c[6]?' <span class="pill esc">'+esc(c[6])+'</span>':'')+'</td></tr>';}).join('');
      var body=document.getElementById('mt-conn-rows'); if(!body) return;
      body.innerHTML=rows;
      document.getElementById('mt-conn-page').textContent='page '+(p+1)+' of '+n+' ('+list.length+' connections)';
      document.getElementById('mt-conn-prev').disabled=p==0;
      document.getElementById('mt-conn-next').disabled=p>=n-1;
    }
    function goToFlow(i){ showFlows(Math.floor(i/FP)); var el=document.getElementById('flow-'+i); if(el) el.scrollIntoView(); }
    function route(){
      var h=location.hash, m;
      if((m=/flow=(\\d+)/.exec(h))) goToFlow(parseInt(m[1],10));
      else if((m=/page=(\\d+)/.exec(h))) showFlows(parseInt(m[1],10)-1);
    }
    function on(id,f){var e=document.getElementById(id); if(e) e.addEventListener('click',f);}
    on('mt-flow-prev',function(){showFlows(flowPage-1);});
    on('mt-flow-next',function(){showFlows(flowPage+1);});
    on('mt-conn-prev',function(){showConns(connPage-1);});
    on('mt-conn-next',function(){showConns(connPage+1);});
    var fi=document.getElementById('mt-conn-filter');
    if(fi) fi.addEventListener('input',function(){filter=fi.value;showConns(0);});
    window.addEventListener('hashchange',route);
    showConns(0); route();
    })();
    """
}
