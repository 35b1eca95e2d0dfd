// What an operator watches vmss-healer with, on the Application Insights resource the handler
// exports to (`src/edges/telemetry.rs`): three log alert rules and a workbook of the fleet over time.
//
// Every query reads the `customMetrics` the handler exports, by the names and dimensions of
// `telemetry::METRICS` (`tests/infra.rs` holds them to it). Log alerts (scheduledQueryRules
// 2023-12-01, kind LogAlert) rather than metric alerts: custom metric dimensions reach metric
// alerts only when the resource opts in to them, and log queries can compare against the brake's
// threshold directly. Not compiled here (no Bicep CLI); `az bicep build --file infra/main.bicep`.
targetScope = 'resourceGroup'

param name string
param location string

@description('Resource id of the Application Insights component the handler exports to.')
param insightsId string

@description('Where alerts are e-mailed. Empty: the rules still fire and show under Alerts, but notify no one.')
param alertEmail string = ''

@description('Alert when a scale set\'s repairs have been paused (by any brake) for longer than this many minutes.')
@minValue(5)
param brakeAlertMinutes int = 30

@description('Alert when more than this many mirror reads of one scale set failed within 15 minutes.')
@minValue(0)
param mirrorFailureThreshold int = 2

resource notify 'Microsoft.Insights/actionGroups@2023-01-01' = if (!empty(alertEmail)) {
  name: '${name}-alerts'
  location: 'Global'
  properties: {
    // At most 12 characters: it names the sender of every e-mail.
    groupShortName: 'vmss-healer'
    enabled: true
    emailReceivers: [
      { name: 'operator', emailAddress: alertEmail, useCommonAlertSchema: true }
    ]
  }
}

var actions = { actionGroups: empty(alertEmail) ? [] : [notify.id] }

// A give-up is an instance every allowed repair failed on: it needs a person.
resource giveUps 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: '${name}-give-ups'
  location: location
  kind: 'LogAlert'
  properties: {
    displayName: 'vmss-healer gave up on an instance'
    description: 'Every repair HEALER_REPAIR_ACTIONS allows failed on an instance (HEALER_MAX_ATTEMPTS); it stays broken until someone looks. `handler status` and the repairs journal say why.'
    severity: 1
    enabled: true
    scopes: [insightsId]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    criteria: {
      allOf: [
        {
          query: '''
customMetrics
| where name == "healer.repairs"
| where tostring(customDimensions.outcome) == "given_up" and tostring(customDimensions.dry_run) != "true"
| extend scale_set = tostring(customDimensions.scale_set)
| summarize given_up = sum(value) by scale_set
'''
          timeAggregation: 'Total'
          metricMeasureColumn: 'given_up'
          operator: 'GreaterThan'
          threshold: 0
          dimensions: [
            { name: 'scale_set', operator: 'Include', values: ['*'] }
          ]
          failingPeriods: { numberOfEvaluationPeriods: 1, minFailingPeriodsToAlert: 1 }
        }
      ]
    }
    // Each give-up is news: not resolved by the next quiet window.
    autoMitigate: false
    actions: actions
  }
}

// A brake that holds long: a heartbeat pipeline fault, a fleet mostly unhealthy, a stale mirror,
// or an operator's pause someone forgot. Repairs wait on every instance of the set meanwhile.
resource brakeHeld 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: '${name}-brake-held'
  location: location
  kind: 'LogAlert'
  properties: {
    displayName: 'vmss-healer repairs paused too long'
    description: 'A scale set\'s repairs have been paused longer than ${brakeAlertMinutes} minutes; the `brake` dimension says which (pipeline_fault, too_many_unhealthy, stale_mirror, paused_by_operator, …).'
    severity: 2
    enabled: true
    scopes: [insightsId]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    criteria: {
      allOf: [
        {
          query: '''
customMetrics
| where name == "healer.brake.held_seconds"
| extend scale_set = tostring(customDimensions.scale_set), brake = tostring(customDimensions.brake)
| summarize held_minutes = max(value) / 60 by scale_set, brake
'''
          timeAggregation: 'Maximum'
          metricMeasureColumn: 'held_minutes'
          operator: 'GreaterThan'
          threshold: brakeAlertMinutes
          dimensions: [
            { name: 'scale_set', operator: 'Include', values: ['*'] }
            { name: 'brake', operator: 'Include', values: ['*'] }
          ]
          failingPeriods: { numberOfEvaluationPeriods: 1, minFailingPeriodsToAlert: 1 }
        }
      ]
    }
    autoMitigate: true
    actions: actions
  }
}

// The mirror is what every decision reads: reads that keep failing leave it stale, and the
// stale-mirror brake then stops repairs. A whole monitor-state invocation that failed (storage
// down, say) counts against every scale set at once.
resource mirrorFailing 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: '${name}-mirror-failing'
  location: location
  kind: 'LogAlert'
  properties: {
    displayName: 'vmss-healer cannot mirror a scale set'
    description: 'More than ${mirrorFailureThreshold} mirror reads of a scale set failed (throttled, timed out, not found, refused) within 15 minutes, or monitor-state itself failed.'
    severity: 2
    enabled: true
    scopes: [insightsId]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: '''
let reads = customMetrics
| where name == "healer.mirror.passes"
| extend scale_set = tostring(customDimensions.scale_set), outcome = tostring(customDimensions.outcome)
| where outcome !in ("synced", "fresh", "deferred")
| summarize failed = sum(value) by scale_set;
let passes = customMetrics
| where name == "healer.pass.duration"
| where tostring(customDimensions.function) == "monitor-state" and tostring(customDimensions.result) != "ok"
| summarize failed = sum(valueCount)
| extend scale_set = "(every scale set)";
union reads, passes
| where failed > 0
'''
          timeAggregation: 'Total'
          metricMeasureColumn: 'failed'
          operator: 'GreaterThan'
          threshold: mirrorFailureThreshold
          dimensions: [
            { name: 'scale_set', operator: 'Include', values: ['*'] }
          ]
          failingPeriods: { numberOfEvaluationPeriods: 1, minFailingPeriodsToAlert: 1 }
        }
      ]
    }
    autoMitigate: true
    actions: actions
  }
}

// The fleet over time. Its name must be a GUID; the same one on every redeploy of this group.
resource fleet 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: guid(resourceGroup().id, name, 'fleet-workbook')
  location: location
  kind: 'shared'
  properties: {
    displayName: 'vmss-healer: the fleet'
    category: 'workbook'
    version: '1.0'
    sourceId: insightsId
    serializedData: loadTextContent('workbook.json')
  }
}

output workbookId string = fleet.id
output alertRuleIds array = [giveUps.id, brakeHeld.id, mirrorFailing.id]
