// The patient's consent page. Everything it can do goes through /consent/<token>/…; the
// verifier returned by a matching date of birth stays in this page's memory only.

const base = location.pathname.replace(/\/+$/, "");
const $ = (id) => document.getElementById(id);
let verifier = null;
let polling = null;
let shownFingerprint = null; // the verified destination this page shows, if any

const MODALITY = {
  CT: "CT scan", MR: "MRI scan", CR: "X-ray", DX: "X-ray", US: "Ultrasound", PT: "PET scan",
  NM: "Nuclear medicine", XA: "Angiography", MG: "Mammography", SR: "Report", DOC: "Document",
};

function show(id) {
  for (const s of ["intro", "step-dob", "step-decide", "step-done", "step-gone"]) {
    if (s !== "intro") $(s).hidden = s !== id;
  }
}

function time(epoch) {
  return new Date(epoch * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function dateText(dicomDate) {
  const m = /^(\d{4})(\d{2})(\d{2})$/.exec(dicomDate || "");
  if (!m) return "not recorded";
  return new Date(Date.UTC(+m[1], +m[2] - 1, +m[3])).toLocaleDateString([], {
    year: "numeric", month: "long", day: "numeric", timeZone: "UTC",
  });
}

async function call(path, body) {
  const opts = body === undefined
    ? { headers: verifier ? { "X-Consent-Verifier": verifier } : {} }
    : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  let resp;
  try {
    resp = await fetch(base + path, { ...opts, cache: "no-store", credentials: "omit" });
  } catch {
    return { ok: false, status: 0, data: { message: "Cannot reach the hospital's system. Check your connection and try again." } };
  }
  let data = {};
  try { data = await resp.json(); } catch { /* an empty or non-JSON answer */ }
  return { ok: resp.ok, status: resp.status, data };
}

function gone(message) {
  $("title").textContent = "This link cannot be used";
  $("intro").hidden = true;
  $("gone-text").textContent = message;
  show("step-gone");
  stopPolling();
}

function destination(s) {
  const d = s.destination;
  if (d.verified) return { name: d.name, note: "", full: `${d.name}`, fp: d.fingerprint };
  if (d.intended) {
    return { name: d.intended, note: " (not yet connected)", full: `${d.intended} (not yet connected)`, fp: "" };
  }
  return { name: "the hospital treating you", note: " (not yet connected)", full: "not yet connected", fp: "" };
}

function render(s) {
  const d = destination(s);
  shownFingerprint = s.destination.verified ? s.destination.fingerprint : null;
  $("title").textContent = "May we send your scans?";
  $("sender").textContent = s.sender;
  $("dest-name").textContent = d.name;
  $("dest-note").textContent = d.note;
  $("purpose").textContent = `Why: ${s.purpose}.`;
  $("until").textContent = time(s.expires);
  $("intro").hidden = false;
  if (s.study) {
    $("study-date").textContent = dateText(s.study.date);
    $("study-modality").textContent = (s.study.modalities || []).map((m) => MODALITY[m] || m).join(", ") || "scan";
    $("study-desc").textContent = s.study.description || "not recorded";
    $("study-images").textContent = String(s.study.images);
    const full = $("dest-full");
    full.textContent = d.full;
    if (d.fp) {
      const fp = document.createElement("div");
      fp.className = "fp";
      fp.textContent = `identity ${d.fp}`;
      full.appendChild(fp);
    }
  }
  $("wait-dest").hidden = s.can_approve_now;
  $("approve").disabled = !s.can_approve_now;

  if (s.state === "pending") {
    show(verifier ? "step-decide" : "step-dob");
    if (!s.needs_dob) {
      gone("This study has no date of birth to check against. Please tell the hospital staff; they can authorise the transfer another way.");
    }
    return;
  }
  show("step-done");
  const doneTitle = $("done-title");
  const doneText = $("done-text");
  $("revoke").hidden = true;
  if (s.state === "approved") {
    doneTitle.textContent = `Approved at ${time(s.decided_at)}`;
    doneText.textContent = `Your scans go to ${d.name}. You can stop it below until the transfer is complete.`;
    $("revoke").hidden = !verifier || s.transfer === "completed";
  } else if (s.state === "declined") {
    doneTitle.textContent = "You declined";
    doneText.textContent = "Nothing was sent. You can close this page.";
  } else if (s.state === "revoked") {
    doneTitle.textContent = "You stopped the transfer";
    doneText.textContent = "Sending was stopped. The receiving hospital has been told.";
  } else if (s.state === "break-glass") {
    doneTitle.textContent = "A clinician authorised this transfer";
    doneText.textContent = "It was decided on your behalf because you could not decide at the time. This is recorded.";
  } else {
    doneTitle.textContent = "No decision is needed";
    doneText.textContent = "";
  }
  const t = { active: "Waiting for the receiving hospital.", paired: "Connected to the receiving hospital.",
    sending: "Sending now…", completed: "Transfer complete: the receiving hospital has confirmed every image." };
  $("transfer-state").textContent = t[s.transfer] || "";
  $("transfer-state").hidden = !t[s.transfer] || s.state !== "approved";
}

async function refresh() {
  const r = await call("/state");
  if (!r.ok) {
    if (r.status === 404 || r.status === 410) gone(r.data.message || "This link has expired.");
    return;
  }
  render(r.data);
  if (["declined", "revoked"].includes(r.data.state) || r.data.transfer === "completed") stopPolling();
}

function startPolling() {
  if (!polling) polling = setInterval(refresh, 2000);
}

function stopPolling() {
  if (polling) clearInterval(polling);
  polling = null;
}

$("dob-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const err = $("dob-error");
  err.hidden = true;
  const dob = $("dob").value;
  if (!dob) {
    err.textContent = "Please enter the date of birth.";
    err.hidden = false;
    return;
  }
  $("dob-submit").disabled = true;
  const r = await call("/verify", { dob });
  $("dob-submit").disabled = false;
  if (r.ok) {
    verifier = r.data.verifier;
    render(r.data);
    startPolling();
    return;
  }
  if (r.status === 410 || r.data.error === "dead") return gone(r.data.message);
  err.textContent = r.data.message || "That did not work. Please try again.";
  err.hidden = false;
});

for (const radio of document.querySelectorAll("input[name=by]")) {
  radio.addEventListener("change", () => {
    $("rep-fields").hidden = document.querySelector("input[name=by]:checked").value !== "representative";
  });
}

async function decide(decision) {
  const err = $("decide-error");
  err.hidden = true;
  const by = document.querySelector("input[name=by]:checked").value;
  const body = { verifier, decision, by, shown_fingerprint: shownFingerprint };
  if (by === "representative") {
    body.name = $("rep-name").value;
    body.relationship = $("rep-rel").value;
  }
  for (const b of ["approve", "decline"]) $(b).disabled = true;
  const r = await call("/decision", body);
  for (const b of ["approve", "decline"]) $(b).disabled = false;
  if (r.ok) return render(r.data);
  if (r.status === 410 || r.status === 404) return gone(r.data.message);
  err.textContent = r.data.message || "That did not work. Please try again.";
  err.hidden = false;
  refresh();
}

$("approve").addEventListener("click", () => decide("approve"));
$("decline").addEventListener("click", () => decide("decline"));
$("revoke").addEventListener("click", async () => {
  if (!confirm("Stop sending your scans now?")) return;
  const r = await call("/revoke", { verifier });
  if (r.ok) return render(r.data);
  $("revoke-error").textContent = r.data.message || "That did not work. Please try again.";
  $("revoke-error").hidden = false;
});

refresh().then(startPolling);
