#!/usr/bin/env bash
# Offline validation of the Kubernetes manifests (no cluster is needed):
#   1. each object against the Kubernetes 1.3x OpenAPI schemas, strictly
#      (unknown fields are errors), with kubernetes-validate, installed with
#      pip into a throwaway virtualenv if it is not on PATH;
#   2. what the schemas cannot see, checked in Python (PyYAML): the Service
#      selects the scheduler's pods and targets ports the container
#      declares; workers and the client reach that Service's name and port;
#      every token comes from the same Secret key and none is written in a
#      manifest; worker names come from the pod name; the threads'
#      resourceFieldRef names the worker container; the commands the
#      manifests run are the paths the Dockerfile installs.
#
#   bash executors/distributed/deploy/kubernetes/validate.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
validator=$(command -v kubernetes-validate || true)
if [ -z "$validator" ]; then
  venv=${RASK_K8S_VENV:-/tmp/rask-k8s-validate}
  if [ ! -x "$venv/bin/kubernetes-validate" ]; then
    python3 -m venv "$venv"
    timeout 300 "$venv/bin/pip" install -q kubernetes-validate
  fi
  validator=$venv/bin/kubernetes-validate
fi
"$validator" --strict rask.yaml client-job.yaml

python="${venv:-}/bin/python"
[ -x "$python" ] || python=python3
"$python" - <<'PY'
import re, sys, yaml
docs = [d for f in ("rask.yaml", "client-job.yaml") for d in yaml.safe_load_all(open(f)) if d]
by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
problems = []
def check(ok, what):
    if not ok:
        problems.append(what)

sched = by[("Deployment", "rask-scheduler")]
svc = by[("Service", "rask-scheduler")]
workers = by[("Deployment", "rask-worker")]
client = by[("Job", "rask-client")]
for dep in (sched, workers):
    check(dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items(),
          f"{dep['metadata']['name']}: selector does not match its pods")
pod_labels = sched["spec"]["template"]["metadata"]["labels"]
check(svc["spec"]["selector"].items() <= pod_labels.items(), "the Service does not select the scheduler")
check(not (svc["spec"]["selector"].items() <= workers["spec"]["template"]["metadata"]["labels"].items()),
      "the Service selects the workers too")
(sc,) = sched["spec"]["template"]["spec"]["containers"]
ports = {p["name"]: p["containerPort"] for p in sc["ports"]}
for p in svc["spec"]["ports"]:
    check(p["targetPort"] in ports, f"Service port {p['name']} targets no container port")
sport = {p["name"]: p["port"] for p in svc["spec"]["ports"]}["scheduler"]
args = sc["args"]
check(args[args.index("--port") + 1] == str(ports["scheduler"]), "--port differs from the container port")
check(args[args.index("--host") + 1] == "0.0.0.0", "the scheduler must listen on every interface")
dash = args[args.index("--dashboard") + 1]
check(dash.endswith(f":{ports['dashboard']}"), "--dashboard differs from the container port")

def env(container):
    return {e["name"]: e for e in container.get("env", [])}
secret_refs = set()
for dep, var in ((workers, "RASK_WORKER"), (client, "RASK_SCHEDULER")):
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    e = env(c)
    m = re.fullmatch(r"tcp://([a-z0-9.-]+):(\d+)", e.get(var, {}).get("value", ""))
    check(m is not None, f"{dep['metadata']['name']}: {var} is not tcp://host:port")
    if m:
        check(m.group(1) == svc["metadata"]["name"], f"{var} does not name the Service")
        check(int(m.group(2)) == sport, f"{var} does not use the Service's port")
for d in (sched, workers, client):
    for c in d["spec"]["template"]["spec"]["containers"]:
        e = env(c)
        tok = e.get("RASK_TOKEN")
        check(tok is not None and "value" not in tok, f"{c['name']}: RASK_TOKEN must come from the Secret")
        if tok:
            ref = tok["valueFrom"]["secretKeyRef"]
            secret_refs.add((ref["name"], ref["key"]))
        check("RASK_INSECURE" not in e, f"{c['name']}: RASK_INSECURE set")
        check(not any("token" in a.lower() for a in c.get("args", []) + c.get("command", [])),
              f"{c['name']}: a token on the command line")
check(len(secret_refs) == 1, f"tokens from several Secret keys: {secret_refs}")
(wc,) = workers["spec"]["template"]["spec"]["containers"]
we = env(wc)
check(we["RASK_WORKER_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name",
      "worker names must be unique: take the pod's name")
rf = we["RASK_WORKER_THREADS"]["valueFrom"]["resourceFieldRef"]
check(rf["containerName"] == wc["name"], "RASK_WORKER_THREADS names another container")
check(rf["resource"] in wc["resources"].get("limits", {}) or rf["resource"].split(".", 1)[1] in wc["resources"].get("limits", {}),
      "RASK_WORKER_THREADS reads a limit the worker does not set")
docker = open("Dockerfile").read()
for path in sc["command"] + ["/usr/local/bin/rask-program"]:
    check(path.rsplit("/", 1)[1] in docker, f"the image has no {path}")
check('ENTRYPOINT ["/usr/local/bin/rask-program"]' in docker, "workers and clients run the image's program")
if problems:
    print("\n".join("problem: " + p for p in problems))
    sys.exit(1)
print(f"consistent: {len(docs)} objects (scheduler, Service, workers, client Job)")
PY
