// monitor-events' subscription to one resource group's Resource Manager events: writes, deletes
// and actions on scale sets and their instances (design §2), and on virtual machines — a Flexible
// scale set's instances are plain VMs (the trailing `/` keeps `virtualMachineScaleSets` apart).
// Successes update the mirror; failures (an operation that may have left instances `Failed`) and
// power-offs have the set read and evaluated at once (issue 19). Event types as listed in
// https://learn.microsoft.com/azure/event-grid/event-schema-resource-groups.
param systemTopicName string
param destination object

resource systemTopic 'Microsoft.EventGrid/systemTopics@2022-06-15' existing = {
  name: systemTopicName
}

resource subscription 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2022-06-15' = {
  parent: systemTopic
  name: 'monitor-events'
  properties: {
    destination: destination
    eventDeliverySchema: 'EventGridSchema'
    filter: {
      includedEventTypes: [
        'Microsoft.Resources.ResourceWriteSuccess'
        'Microsoft.Resources.ResourceDeleteSuccess'
        'Microsoft.Resources.ResourceActionSuccess'
        'Microsoft.Resources.ResourceWriteFailure'
        'Microsoft.Resources.ResourceDeleteFailure'
        'Microsoft.Resources.ResourceActionFailure'
      ]
      advancedFilters: [
        {
          operatorType: 'StringBeginsWith'
          key: 'data.operationName'
          values: ['Microsoft.Compute/virtualMachineScaleSets', 'Microsoft.Compute/virtualMachines/']
        }
      ]
    }
    // A missed RM event costs at most one full-resync interval (HEALER_FULL_RESYNC); retry for a day.
    retryPolicy: { maxDeliveryAttempts: 30, eventTimeToLiveInMinutes: 1440 }
  }
}
