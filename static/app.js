// nixery's pages: copy buttons, search as you type, and a build's phases as they happen.
// Everything works without this script; it only adds live updates.
'use strict';

(() => {
  const el = (tag, className, text) => {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  };

  // Copy buttons: the command in data-copy to the clipboard, or selected when that is refused.
  document.addEventListener('click', (event) => {
    const button = event.target.closest('button.copy');
    if (!button) return;
    const done = () => {
      button.textContent = 'Copied';
      button.classList.add('copied');
      setTimeout(() => { button.textContent = 'Copy'; button.classList.remove('copied'); }, 1500);
    };
    const select = () => {
      const code = button.parentElement.querySelector('code');
      if (code) window.getSelection().selectAllChildren(code);
    };
    if (navigator.clipboard) navigator.clipboard.writeText(button.dataset.copy).then(done, select);
    else select();
  });

  // Search as you type, from /api/v1/packages.
  const form = document.getElementById('search');
  const results = document.getElementById('results');
  const note = document.getElementById('search-note');
  if (form && results) {
    const input = form.querySelector('input[name=q]');
    let timer;
    let latest = 0;
    const hit = (p) => {
      const pull = `docker pull ${location.host}/shell/${p.name}`;
      const li = el('li', 'package');
      const head = el('div', 'package-head');
      const name = el('a', 'name', p.name);
      name.href = `/build/shell/${p.name}`;
      head.append(name, el('span', 'version', p.version || ''));
      li.append(head);
      if (p.description) li.append(el('p', 'description', p.description));
      const command = el('div', 'command pull');
      const copy = el('button', 'copy', 'Copy');
      copy.type = 'button';
      copy.dataset.copy = pull;
      command.append(el('code', '', pull), copy);
      li.append(command);
      return li;
    };
    const search = async () => {
      const query = input.value.trim();
      const mine = ++latest;
      if (!query) { results.replaceChildren(); note.textContent = ''; return; }
      let response;
      try {
        response = await fetch(`/api/v1/packages?limit=10&q=${encodeURIComponent(query)}`);
      } catch (err) {
        note.textContent = 'The search could not reach the server.';
        return;
      }
      if (mine !== latest) return;
      const body = await response.json();
      if (response.status === 503) {
        note.textContent = 'The package catalog is being made; searching again in a few seconds…';
        timer = setTimeout(search, 3000);
        return;
      }
      if (!response.ok) {
        results.replaceChildren();
        note.textContent = body.errors ? body.errors[0].message : 'The search failed.';
        return;
      }
      results.replaceChildren(...body.packages.map(hit));
      note.textContent = body.packages.length ? `in ${body.package_set}` : `No package matches “${query}”.`;
    };
    input.addEventListener('input', () => { clearTimeout(timer); timer = setTimeout(search, 150); });
    form.addEventListener('submit', (event) => { event.preventDefault(); clearTimeout(timer); search(); });
  }

  // A build page: follow the build's events; when it ends, show the page of its result.
  const build = document.getElementById('build');
  if (!build) return;
  const reference = build.dataset.reference;
  const phases = [...document.querySelectorAll('#phases li')];
  const status = document.getElementById('status');
  const mark = (li, state) => { li.className = state; };

  const show = (phase, data) => {
    const at = phases.findIndex((li) => li.dataset.phase === phase);
    if (at < 0) return;
    phases[at].querySelector('.text').textContent = data.text;
    phases.forEach((li, i) => { if (i < at) mark(li, 'done'); });
    const ongoing = phase === 'queued' || ((phase === 'derivations' || phase === 'layers') && data.done < data.total);
    mark(phases[at], ongoing ? 'active' : 'done');
    if (!ongoing && phases[at + 1] && phases[at + 1].className === 'pending') mark(phases[at + 1], 'active');
  };

  const follow = () => {
    build.dataset.status = 'running';
    status.className = 'status running';
    status.textContent = 'running';
    const none = document.getElementById('none');
    if (none) none.remove();
    const source = new EventSource(`/api/v1/events/${reference}`);
    let ended = false;
    const end = () => {
      ended = true;
      source.close();
      location.reload();
    };
    for (const li of phases) {
      if (li.dataset.phase === 'done') continue;
      source.addEventListener(li.dataset.phase, (event) => show(li.dataset.phase, JSON.parse(event.data)));
    }
    source.addEventListener('done', end);
    source.addEventListener('failed', end);
    // The stream closes after the last event; if it closes otherwise, show where things are.
    source.onerror = () => {
      if (ended) return;
      source.close();
      setTimeout(() => location.reload(), 2000);
    };
  };

  const waitForStart = async () => {
    try {
      const response = await fetch(`/api/v1/builds/${reference}`);
      if (response.ok) {
        const body = await response.json();
        if (body.status === 'running') follow();
        else location.reload();
        return;
      }
    } catch (err) {
      // The server may be restarting: keep asking.
    }
    setTimeout(waitForStart, 1000);
  };

  if (build.dataset.status === 'running') follow();
  else if (build.dataset.status === 'none') waitForStart();
})();
