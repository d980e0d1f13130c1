{{/* A `helm test` pod (hook `test`; kept after a failure for its log, replaced by the next run).
     ctx: dict root, name (suffix of the pod name), component, command (list), args (list),
     env (YAML list text, may be ""), recipes (bool: mount the inline recipes), pvcs (list of
     `volumes` entries, mounted read-only) */}}
{{- define "quantcore.testPod" -}}
{{- $root := .root -}}
{{- $t := $root.Values.tests -}}
apiVersion: v1
kind: Pod
metadata:
  name: {{ include "quantcore.testPodName" (dict "root" $root "name" .name) }}
  namespace: {{ $root.Release.Namespace }}
  {{- $meta := fromYaml (include "quantcore.podMetadata" (dict "root" $root "component" .component "run" "" "labels" nil "annotations" nil "where" "labels")) }}
  labels:
    {{- toYaml $meta.labels | nindent 4 }}
  annotations:
    {{- with $meta.annotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    helm.sh/hook: test
    helm.sh/hook-delete-policy: before-hook-creation
spec:
  serviceAccountName: {{ include "quantcore.serviceAccountName" $root }}
  automountServiceAccountToken: false
  restartPolicy: Never
  enableServiceLinks: false
  activeDeadlineSeconds: {{ int $t.activeDeadlineSeconds }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $root.Values.defaults.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- include "quantcore.podSecurityContext" $root | nindent 4 }}
  containers:
    - name: {{ .name }}
      image: {{ include "quantcore.image" $root }}
      imagePullPolicy: {{ include "quantcore.pullPolicy" $root }}
      command:
        {{- range .command }}
        - {{ . | quote }}
        {{- end }}
      {{- with .args }}
      args:
        {{- range . }}
        - {{ . | toString | replace "$(" "$$(" | quote }}
        {{- end }}
      {{- end }}
      {{- with .env }}
      env:
        {{- . | nindent 8 }}
      {{- end }}
      {{- include "quantcore.checkPodStorage" (dict "resources" $t.resources "where" "tests.resources" "disk" (list (dict "name" "the test pods' /tmp" "size" "1Gi")) "shm" nil) }}
      resources:
        {{- toYaml $t.resources | nindent 8 }}
      securityContext:
        {{- include "quantcore.containerSecurityContext" $root | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        {{- if and .recipes $root.Values.recipes }}
        - name: recipes
          mountPath: /etc/quantcore/recipes
          readOnly: true
        {{- end }}
        {{- range $i, $p := .pvcs }}
        - name: pvc-{{ $i }}
          mountPath: {{ $p.mountPath }}
          readOnly: true
        {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: 1Gi
    {{- if and .recipes $root.Values.recipes }}
    - name: recipes
      configMap:
        name: {{ include "quantcore.fullname" $root }}-recipes
    {{- end }}
    {{- range $i, $p := .pvcs }}
    - name: pvc-{{ $i }}
      persistentVolumeClaim:
        claimName: {{ $p.claimName }}
        readOnly: true
    {{- end }}
{{- end -}}
